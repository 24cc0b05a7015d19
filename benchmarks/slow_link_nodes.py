"""Two "nodes" of two processes over a slow link: DDP vs flat QSR vs hierarchical QSR (whole model / inter-node floor).

    sudo python benchmarks/slow_link_nodes.py       # ~4-6 min on 2 loaded cores; needs root (netns, tc)

Two network namespaces joined by one veth pair (built by `slow_link.TwoHosts`) stand in for two nodes; each runs
two training processes. gloo binds every process to its namespace's veth address, so traffic between the two
processes of a node goes over that namespace's loopback (unshaped) and traffic between nodes over the veth, shaped
to ``--link`` with ``tc`` in both directions. The same 10.5M-parameter MLP as `slow_link.py` (synthetic teacher
labels, AdamW, batch 16 per process) is trained for ``--steps`` steps with each method, one after the other:

- ``ddp``: DistributedDataParallel over the 4 processes (gradient all-reduce across nodes every step).
- ``qsr_process``: `LocalOptimizer`, one QSR worker per process (the paper), the compressed paper schedule of
  `slow_link.py`.
- ``qsr_node_whole``: ``qsr_worker="node"``, every process averages the whole model across nodes
  (``HierarchicalEngine.split_sync = False``): k = 2 model copies cross the link per sync.
- ``qsr_node_split``: ``qsr_worker="node"`` with the inter-node floor (the default): each process averages half the
  model across nodes, then the node all-gathers it.

Per method: wall time of the training loop (slower rank), syncs, bytes per rank by accounting (`SyncStats`), and
the bytes each node sent on its veth and its loopback (``/sys/class/net/*/statistics/tx_bytes``), next to what the
collectives should send (`expected_tx`; gloo's ring: a rank sends 2(n-1)/n of an n-rank all-reduce's buffer). The
machine is shared: the load average is recorded before and after. Results go to
``benchmarks/results/slow_link_nodes.json``.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median, netns_parser, print_table, write_result
from slow_link import (
    BATCH,
    D_IN,
    HIDDEN,
    PEAK_LR,
    TwoHosts,
    _counters,
    _data,
    _mlp,
    _rate_bps,
    schedule,
    wait_for_workers,
)  # fmt: skip


METHODS = ["ddp", "qsr_process", "qsr_node_whole", "qsr_node_split"]
PER_NODE = 2


def expected_tx(method, r, param_bytes, steps):
    """Bytes a node's processes together should send on (veth, loopback), from the collectives each method runs.

    A 4-rank ring (ranks 0-1-2-3) has one hop leaving each node and one inside it, each carrying 2 x 3/4 of the
    buffer; a 2-rank all-reduce or all-gather sends each rank's own part once.
    """
    if method == "ddp":
        return 1.5 * steps * param_bytes, 1.5 * steps * param_bytes
    if method == "qsr_process":
        return 1.5 * r["bytes_inter_node"], 1.5 * r["bytes_inter_node"]
    return PER_NODE * r["bytes_inter_node"], PER_NODE * r["bytes_intra_node"]


def train(method, rank, steps, ifnames):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from qsr_hf import LocalOptimizer, QSRConfig
    from qsr_hf.engines.hierarchical import HierarchicalEngine

    lrs, warmup, alpha = schedule(steps)
    batches, _ = _data(rank, steps)
    torch.manual_seed(0)
    model = DistributedDataParallel(_mlp())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, steps - 1)] / PEAK_LR)
    if method != "ddp":
        HierarchicalEngine.split_sync = method == "qsr_node_split"
        worker = "process" if method == "qsr_process" else "node"
        config = QSRConfig(qsr_alpha=alpha, qsr_h_base=4, qsr_worker=worker, qsr_node_size=PER_NODE)
        opt = LocalOptimizer(opt, model, config, num_training_steps=steps, num_warmup_steps=warmup)
    dist.barrier()
    before = {link: _counters(name) for link, name in ifnames.items()}
    t0 = time.perf_counter()
    step_s, synced = [], []
    for x, y in batches:
        t_step = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        step_s.append(time.perf_counter() - t_step)
        synced.append(method == "ddp" or opt.last_step_synced)
    dist.barrier()
    wall = time.perf_counter() - t0
    after = {link: _counters(name) for link, name in ifnames.items()}
    local = [t for t, s in zip(step_s, synced, strict=True) if not s]
    out = {"wall_s": wall, "step_median_s": median(step_s), "param_bytes": param_bytes}
    # time the syncing steps took beyond a median local step (communication, less sensitive to the machine's load)
    out["sync_extra_s"] = sum(t - median(local) for t, s in zip(step_s, synced, strict=True) if s) if local else None
    out["tx_bytes"] = {link: after[link]["tx_bytes"] - before[link]["tx_bytes"] for link in ifnames}
    if method == "ddp":
        out.update(syncs=steps, bytes_inter_node=steps * param_bytes, bytes_intra_node=0)
    else:
        opt.close()
        logs = opt.stats.to_logs()
        out.update(
            syncs=int(logs["qsr/syncs"] + logs["qsr/extra_syncs"]),
            bytes_inter_node=int(logs["qsr/bytes_inter_node"]),
            bytes_intra_node=int(logs["qsr/bytes_intra_node"]),  # the node's all-gathers at syncs included
        )
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
        total = flat.clone()
        dist.all_reduce(total)
        out["max_param_diff_between_ranks"] = (flat - total / dist.get_world_size()).abs().max().item()
    return out


def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {"rank": rank, "methods": {}}
    for method in args.methods:
        out["methods"][method] = train(method, rank, args.steps, {"veth": args.ifname, "loopback": "lo"})
    dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(out))


def run_nodes(hosts, args, outdir):
    port = 29_600 + os.getpid() % 1000
    procs, outs = [], []
    for rank in range(2 * PER_NODE):
        node = rank // PER_NODE
        outs.append(Path(outdir) / f"rank{rank}.json")
        env = dict(
            os.environ,
            MASTER_ADDR=hosts.addr[0],
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank % PER_NODE),
            WORLD_SIZE=str(2 * PER_NODE),
            LOCAL_WORLD_SIZE=str(PER_NODE),
            GLOO_SOCKET_IFNAME=hosts.dev[node],
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = ["ip", "netns", "exec", hosts.ns[node], sys.executable, __file__, "--worker", "--out", str(outs[-1])]
        cmd += ["--steps", str(args.steps), "--ifname", hosts.dev[node], "--methods", *args.methods]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return wait_for_workers(procs, outs, args.timeout, "slow_link_nodes.py")


def main(argv=None):
    parser = netns_parser(__doc__, 100, METHODS, 1200, "seconds to wait for the workers")
    parser.add_argument("--link", default="1gbit", help="tc rate of the inter-node veth")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("slow_link_nodes.py needs root (network namespaces, tc): run it with sudo")

    load_before = [round(x, 2) for x in os.getloadavg()]
    t_start = time.time()
    with TwoHosts() as hosts, tempfile.TemporaryDirectory() as tmp:
        shaping = hosts.shape(args.link, 0.0)
        results = run_nodes(hosts, args, tmp)
    methods, rows = {}, []
    for m in args.methods:
        per_rank = [r["methods"][m] for r in results]
        r0 = per_rank[0]
        # every process of a node reads the same namespace counters: take the node's first process
        tx = {
            f"{link}_per_node": [per_rank[n * PER_NODE]["tx_bytes"][link] for n in range(2)]
            for link in ("veth", "loopback")
        }
        exp_veth, exp_lo = expected_tx(m, r0, r0["param_bytes"], args.steps)
        methods[m] = {
            "wall_s": max(r["wall_s"] for r in per_rank),
            "step_median_s": max(r["step_median_s"] for r in per_rank),
            "sync_extra_s": None if r0["sync_extra_s"] is None else max(r["sync_extra_s"] for r in per_rank),
            "syncs": r0["syncs"],
            "accounted_bytes_inter_node_per_rank": r0["bytes_inter_node"],
            "accounted_bytes_intra_node_per_rank": r0["bytes_intra_node"],
            "tx_bytes": tx,
            "expected_tx_bytes_per_node": {"veth": exp_veth, "loopback": exp_lo},
            "veth_tx_over_expected": [v / exp_veth for v in tx["veth_per_node"]],
            "loopback_tx_over_expected": [v / exp_lo if exp_lo else None for v in tx["loopback_per_node"]],
            "max_param_diff_between_ranks": max(r["max_param_diff_between_ranks"] for r in per_rank),
        }
    floor_s = None
    for m, r in methods.items():
        r["ratio_to_ddp"] = r["wall_s"] / methods["ddp"]["wall_s"] if "ddp" in methods else None
        if r["syncs"] and m != "ddp":
            # the inter-node floor of one sync: one model between 2 nodes, 2 x 1/2 of it each way = S at link rate
            floor_s = r0["param_bytes"] * 8 / _rate_bps(args.link)
            r["veth_mb_per_sync_per_node"] = sum(r["tx_bytes"]["veth_per_node"]) / 2 / r["syncs"] / 1e6
        rows.append(
            [
                m,
                f"{r['wall_s']:.1f}",
                f"{r['ratio_to_ddp']:.2f}" if r["ratio_to_ddp"] else "",
                r["syncs"],
                f"{r['accounted_bytes_inter_node_per_rank'] / 1e6:.0f}",
                f"{sum(r['tx_bytes']['veth_per_node']) / 2e6:.0f}",
                f"{min(r['veth_tx_over_expected']):.3f}-{max(r['veth_tx_over_expected']):.3f}",
                f"{sum(r['tx_bytes']['loopback_per_node']) / 2e6:.0f}",
                f"{r.get('veth_mb_per_sync_per_node', float('nan')):.1f}",
                "" if r["sync_extra_s"] is None else f"{r['sync_extra_s'] / r['syncs']:.2f}",
            ]
        )
    load_after = [round(x, 2) for x in os.getloadavg()]
    path = write_result(
        "slow_link_nodes",
        {
            "setup": (
                f"2 netns x {PER_NODE} processes, veth shaped to {args.link}, loopback inside a node unshaped; gloo, "
                f"1 thread per process; MLP {D_IN}-{HIDDEN}x3-10, AdamW, batch {BATCH}/process, {args.steps} steps"
            ),
            "shaping": shaping,
            "model_mb": r0["param_bytes"] / 1e6,
            "floor_mb_per_sync_per_node": r0["param_bytes"] / 1e6,
            "floor_s_per_sync_at_link_rate": floor_s,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "total_s": time.time() - t_start,
            "methods": methods,
        },
    )
    print(f"load average before {load_before}, after {load_after} (2 cores)")
    print_table(
        ["method", "wall s", "/ ddp", "syncs", "MB inter-node/rank (acct)", "MB veth/node", "veth / expected",
         "MB loopback/node", "MB veth per sync/node", "s per sync beyond a local step"],
        rows,
    )  # fmt: skip
    print(f"wrote {path}")
    return None


if __name__ == "__main__":
    main()
