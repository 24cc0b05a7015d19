"""QSR across torchft replica groups in a plain torch loop: one process per replica group, a lighthouse for quorums.

Launch (docs/fault-tolerance.md; `pip install "qsr_hf[ft]"`):

    torchft_lighthouse --min_replicas 2 --join_timeout_ms 10000 &
    for i in 0 1 2; do
      TORCHFT_LIGHTHOUSE=http://localhost:29510 torchrun --nproc_per_node 1 --master_port $((29600 + i)) \
        examples/torchft_local_sgd.py --replica-id $i &
    done

A replica group may also be several processes (``--nproc_per_node 2``): the model is then wrapped in DDP inside the
group, and rank ``i`` of each group averages with rank ``i`` of the others. Kill one replica group (``kill -9``)
mid-round: the others go on and average between themselves from the next sync.
Start it again with the same command: it joins at the others' next sync with their state and ends equal to them.
``--kill-after`` and ``--sleep-after`` inject those faults (used by tests/test_torchft.py). ``--save-at`` writes
each replica group's local state into its own folder under ``--save-dir``. When every replica group has died, start
them again with the same ``--save-dir``: the first quorum resumes from the newest complete checkpoint in it (the lr
scheduler is stepped to its step). ``--resume`` instead loads each replica group's own folder, all groups together,
to continue exactly as if the run had not stopped (docs/fault-tolerance.md).
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qsr_hf import QSRConfig
from qsr_hf.ft import FTLocalOptimizer, make_manager
from qsr_hf.sync.agreement import tensors_checksum


def batch(index: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th batch of one global stream (the same on every replica group)."""
    g = torch.Generator().manual_seed(index)
    x = torch.randn(size, 8, generator=g)
    return x, (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replica-id", type=int, required=True)
    parser.add_argument("--lighthouse", default=None, help="defaults to $TORCHFT_LIGHTHOUSE")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--replica-groups", type=int, default=3, help="replica groups of the job")
    parser.add_argument("--min-replicas", type=int, default=None, help="defaults to a majority of --replica-groups")
    parser.add_argument("--allow-minority-quorum", action="store_true", help="UNSAFE: accept a minority quorum")
    parser.add_argument("--quorum-timeout", type=float, default=600.0)
    parser.add_argument("--step-time", type=float, default=0.0, help="seconds slept per step (a slower model)")
    parser.add_argument("--kill-after", type=int, default=-1, help="SIGKILL this process after that many steps")
    parser.add_argument("--sleep-after", type=int, default=-1, help="sleep --sleep seconds after that many steps")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--on-nonfinite", default="error", choices=["error", "skip_rank"], help="qsr_on_nonfinite")
    parser.add_argument("--outer", default="none", choices=["none", "sgd", "nesterov"], help="qsr_outer_optimizer")
    parser.add_argument("--save-at", type=int, default=-1, help="save the local state after that optimizer step")
    parser.add_argument(
        "--save-dir", default=None, help="checkpoint folder (one sub-folder per replica group); resumed when all died"
    )
    parser.add_argument("--resume", default=None, help="checkpoint folder written by --save-at: continue from it")
    parser.add_argument("--out", default=None, help="write the per-sync record here (JSON)")
    args = parser.parse_args(argv)
    if not dist.is_initialized():  # torchrun sets these; a plain `python` start gets a one-process replica group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + args.replica_id))
        dist.init_process_group(
            "gloo", rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))
        )

    torch.manual_seed(0)  # the same initial weights in every replica group
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    rank, group_size = dist.get_rank(), dist.get_world_size()
    if group_size > 1:  # a replica group of several processes is one DDP group (gradients all-reduced inside it)
        model = nn.parallel.DistributedDataParallel(model)
    # lr 0.01 -> 0.003: with alpha = 0.01 QSR's H = max(4, (alpha / lr)^2) grows from 4 to 11
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1 - 0.7 * s / args.steps)
    manager = make_manager(  # QSR: a sync needs a majority of the job's replica groups (one model, not two)
        args.replica_id,
        args.lighthouse,
        args.min_replicas,
        quorum_timeout=args.quorum_timeout,
        num_replica_groups=args.replica_groups,
        allow_minority_quorum=args.allow_minority_quorum,
    )
    config = QSRConfig(
        qsr_alpha=0.01, qsr_h_base=4, qsr_outer_optimizer=args.outer, qsr_on_nonfinite=args.on_nonfinite
    )
    # QSR: joins the replica groups (waits for a quorum). When no live replica group is ahead (a new job, or every
    # group died), the first quorum resumes from the newest complete checkpoint under --save-dir (any group's), or
    # warns on every rank that it starts from scratch
    optimizer = FTLocalOptimizer(
        inner,
        model,
        config,
        manager=manager,
        checkpoint_dir=args.save_dir,
        lr_scheduler=scheduler,
        num_training_steps=args.steps,
    )
    if args.resume:  # QSR: every replica group resumes from its own folder, together
        folder = Path(args.resume) / f"replica_{args.replica_id}"
        optimizer.load_local_state(folder)  # parameters, AdamW state, schedule position, outer state, data position
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    params = list(model.parameters())
    # a joining replica holds a live peer's AdamW state (its step count is the peer's): record it
    adam_steps = [int(state["step"]) for state in inner.state.values()]
    record = {"joined_at": optimizer.global_step, "adam_steps_at_join": adam_steps, "syncs": []}
    taken = 0  # steps taken by this process
    while optimizer.global_step < args.steps:  # QSR: a joining replica continues from the others' step
        if taken == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if taken == args.sleep_after:
            time.sleep(args.sleep)
        taken += 1
        # QSR: this replica group's shard of the step's global batch, split between the group's processes
        x, y = batch(optimizer.batch_index() * group_size + rank)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if optimizer.last_step_synced:
            logs = optimizer.stats.to_logs()
            record["syncs"].append([optimizer.global_step, int(logs["qsr/replicas"]), tensors_checksum(params)])
        if optimizer.global_step == args.save_at:  # QSR: each replica group's own folder (its files are rank 0's)
            folder = Path(args.save_dir) / f"replica_{args.replica_id}"
            optimizer.save_local_state(folder)
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        time.sleep(args.step_time)
    optimizer.close()
    record.update(final=tensors_checksum(params), stats=optimizer.stats.to_logs())
    print(f"replica {args.replica_id}: step {optimizer.global_step}; {record['stats']}", flush=True)
    manager.shutdown(wait=False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f)
    return record


if __name__ == "__main__":
    main()
