"""A complete `accelerate launch` training loop with QSR. The QSR lines are marked `# QSR`.

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml examples/accelerate_loop.py

Trains a small MLP on scikit-learn's digits (shipped with the package: no download) with Local AdamW, cosine lr with
warm-up, gradient accumulation and clipping, and prints the averaged model's test accuracy and what QSR communicated.
"""

import argparse

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_cosine_schedule_with_warmup

from qsr_hf import LocalOptimizer, QSRConfig  # QSR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=7e-3)  # QSR: just above lr * sqrt(H_base) = 6e-3
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=2)
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=32, shuffle=True, drop_last=True)
    test = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=256)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    # accelerate's convention: a prepared scheduler advances num_processes times per optimizer step, so it is built
    # with the step counts of one process
    n = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.steps // 10 * n, args.steps * n)
    model, optimizer, train, test, scheduler = accelerator.prepare(model, optimizer, train, test, scheduler)
    optimizer = LocalOptimizer(  # QSR: after prepare; no gradient all-reduce from here on
        optimizer,
        model,
        QSRConfig(qsr_alpha=args.alpha, qsr_h_base=2),
        lr_scheduler=scheduler,  # QSR
    )  # QSR: warm-up and length (in optimizer steps) are read from the scheduler

    step = 0
    while step < args.steps:
        for inputs, labels in train:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(inputs), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # local: no collective
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if step == args.steps:
                    break
    optimizer.close()  # QSR: final average (if a round is open) and gradient sync back on

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in test:
            preds, labels = accelerator.gather_for_metrics((model(inputs).argmax(-1), labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
    stats = optimizer.stats.to_logs()  # QSR
    if accelerator.is_main_process:
        print(f"test accuracy {correct / total:.3f}; {stats}")
    accelerator.end_training()
    # free the DDP wrapper (and with it the process group) now: left to interpreter shutdown, gloo can abort
    model, optimizer = accelerator.free_memory(model, optimizer)


if __name__ == "__main__":
    main()
