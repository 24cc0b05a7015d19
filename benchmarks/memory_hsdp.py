"""Memory per rank of a ~200M-parameter model: FSDP2 sharded inside the node (QSR's HSDP mode) vs DDP.

    python benchmarks/memory_hsdp.py       # ~2 min on 2 cores, ~9 GB of RAM at its peak

What is measured is tensor bytes, exactly: the storages (each counted once) that hold the parameters, their
gradients and the AdamW state after one optimizer step, plus what qsr_hf keeps for a sync (the averager's flat
buffers, the engine's copies of the shards), on every rank. RSS is not used: the allocator and the libraries make it
noisy on a shared machine. DDP's own gradient buckets (a reducer-internal copy of the gradients unless
``gradient_as_bucket_view=True``) are not reachable from Python and not counted.

- ``ddp``: `DistributedDataParallel` on 2 processes with `LocalOptimizer` (one QSR worker per process); per-rank
  memory does not depend on the number of processes.
- ``fsdp2_node``: 4 processes as 2 nodes x 2, ``fully_shard(model, mesh=mesh["shard"])`` on each node's 2 ranks
  (built on the meta device, then materialized shard by shard), with `LocalOptimizer` (`FSDP2Engine`).

Results go to ``benchmarks/results/memory_hsdp.json``.
"""

import argparse
import os

from _common import print_table, write_result


WIDTH, LAYERS = 4096, 12  # 12 x (4096 x 4096 + 4096) = 201.4M parameters


def _model():
    from torch import nn

    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(LAYERS)])


def _storage_bytes(tensors, seen):
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _measure(mode, rank, world_size, port, queue):
    import torch
    import torch.distributed as dist

    from qsr_hf import LocalOptimizer, QSRConfig
    from qsr_hf.sync.tensor_selection import optimizer_state_tensors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(_model())
        params = list(model.parameters())
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("replicate", "shard"))
        with torch.device("meta"):
            model = _model()
        for layer in model:
            fully_shard(layer, mesh=mesh["shard"])
        fully_shard(model, mesh=mesh["shard"])
        model.to_empty(device="cpu")
        for layer in model:
            layer[0].reset_parameters()
        params = list(model.parameters())
    adam = torch.optim.AdamW(params, lr=1e-4)
    optimizer = LocalOptimizer(adam, model, QSRConfig(qsr_rule="constant", qsr_h_base=4), num_training_steps=8)
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    optimizer.step()
    seen: set[int] = set()
    out = {
        "parameters": _storage_bytes(params, seen),
        "gradients": _storage_bytes([p.grad for p in params], seen),
        "optimizer_state": _storage_bytes(optimizer_state_tensors(adam), seen),
        "num_parameters": sum(p.numel() for p in params) if mode == "ddp" else None,
    }
    sync = optimizer.synchronizer
    engine_copies = getattr(sync.engine, "_copies", [])
    out["qsr_sync_buffers"] = _storage_bytes([b.flat for b in sync.averager.buckets] + list(engine_copies), seen)
    out["total"] = sum(v for k, v in out.items() if k != "num_parameters" and v is not None)
    optimizer.close()
    dist.destroy_process_group()
    queue.put((rank, out))


def run(mode, world_size):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_measure, args=(mode, r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"memory_hsdp.py: a {mode} process failed (exit code {p.exitcode})")
    return [results[r] for r in range(world_size)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    ddp = run("ddp", 2)
    hsdp = run("fsdp2_node", 4)
    params = ddp[0]["num_parameters"]
    modes = {"ddp (2 processes)": ddp, "fsdp2 inside node (2 nodes x 2)": hsdp}
    rows = []
    for name, per_rank in modes.items():
        for key in ("parameters", "gradients", "optimizer_state", "qsr_sync_buffers", "total"):
            values = [r[key] for r in per_rank]
            rows.append(
                [name, key, f"{max(values) / 2**20:.1f}", f"{max(values) / ddp[0][key]:.3f}" if ddp[0][key] else ""]
            )
    path = write_result(
        "memory_hsdp",
        {
            "setup": f"MLP {LAYERS} x Linear({WIDTH}, {WIDTH}), {params:,} parameters, fp32, AdamW, after one step",
            "num_parameters": params,
            "bytes_per_rank": modes,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
    )
    print_table(["mode", "tensors", "MiB per rank (max over ranks)", "/ ddp"], rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
