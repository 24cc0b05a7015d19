"""QSR with FSDP2 sharding inside each node: parameters and AdamW state sharded across a node's processes, the nodes
(replicas) take local steps and average their shards every H steps. Plain torch, no Accelerate.

    # 4 CPU processes as 2 nodes x 2 (gloo); on GPUs: torchrun --nnodes N --nproc_per_node G ... --device cuda
    torchrun --nproc_per_node 4 examples/fsdp2_hsdp.py --procs-per-node 2 --steps 40

Lines marked `# QSR` are all that local training adds to an FSDP2 loop.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from qsr_hf import LocalOptimizer, QSRConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs-per-node", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device != "cpu":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # (replicate, shard): nodes x processes per node. Shard on the node's 1-D mesh only: FSDP never talks across
    # nodes, and the ranks holding the same shard on every node are the replicas that QSR averages.
    shape = (world // args.procs_per_node, args.procs_per_node)
    mesh = init_device_mesh(args.device, shape, mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    for layer in model[0], model[2], model[4]:
        fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps, eta_min=1e-4)
    config = QSRConfig(qsr_alpha=0.01, qsr_h_base=2)  # QSR: H = max(2, floor((0.01 / lr)^2))
    optimizer = LocalOptimizer(optimizer, model, config, num_training_steps=args.steps)  # QSR
    teacher = torch.nn.Linear(32, 10)  # the same random task on every rank; the data differ per rank
    torch.manual_seed(1 + rank)
    for _ in range(args.steps):
        x = torch.randn(64, 32, device=args.device)
        loss = nn.functional.cross_entropy(model(x), teacher.to(args.device)(x).argmax(-1))
        loss.backward()
        optimizer.step()  # local step; every H-th step averages each rank's shard across nodes
        scheduler.step()
        optimizer.zero_grad()
    optimizer.close()  # QSR: final average if the last round was cut short
    if rank == 0:
        print(f"final loss {loss.item():.3f}; {optimizer.stats.to_logs()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
