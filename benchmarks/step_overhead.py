"""Cost of a non-sync step: qsr_hf's local step vs the bare model (no DDP, the floor) vs plain DDP.

    python benchmarks/step_overhead.py        # ~2-3 min on 2 cores

2 spawned gloo processes (loopback, 1 thread each), a 3.2M-parameter ViT (transformers `ViTForImageClassification`,
4 layers, width 256, 32 px images, patch 8), AdamW, batch 16 per rank. One step = forward + backward + optimizer step +
zero_grad. Variants, each measured on both ranks at once (so the CPU contention is the same):

- ``bare``: the unwrapped model on each rank, no process-group traffic at all (the floor).
- ``ddp``: `accelerator.prepare` (DistributedDataParallel): one gradient all-reduce per step.
- ``local_optimizer``: `accelerator.prepare` + `qsr_hf.LocalOptimizer` with a round longer than the run, so every
  measured step is a local (non-sync) step.
- ``trainer_ddp`` / ``trainer_qsr``: `transformers.Trainer` without and with `qsr_hf.frontends.callback.QSRCallback` (same
  settings, round longer than the run), timed from ``on_step_begin`` to ``on_step_end``. Skipped with a reason if
  `qsr_hf.frontends.callback` cannot be imported.

All variants run in each of ``--rounds`` fresh process pairs, in an order rotated every round. Reported: the median
(and the 10th percentile, which load from other processes on a shared machine disturbs least) over the measured steps
(after ``--warmup`` steps per round) of the slower rank's step time, and ratios to ``bare`` and ``ddp``; and the
median process CPU time per step (all threads, so gloo's communication threads count), which other processes on a
shared machine do not inflate: on a loaded machine it is the number to read for "does a local step cost more". Results go to ``benchmarks/results/step_overhead.json``.
"""

import argparse
import os
import tempfile
import time

from _common import machine_info, median, print_table, quantile, run_distributed, write_result


VIT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 10,
}
BATCH = 16
LOOP_VARIANTS = ["bare", "ddp", "local_optimizer"]
TRAINER_VARIANTS = ["trainer_ddp", "trainer_qsr"]


def _model_and_data(rank, steps):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT))
    g = torch.Generator().manual_seed(100 + rank)
    data = [
        {
            "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 10, (BATCH,), generator=g),
        }
        for _ in range(steps)
    ]
    return model, data


def _loop(rank, world_size, variant, steps):
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from qsr_hf import LocalOptimizer, QSRConfig

    model, data = _model_and_data(rank, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if variant != "bare":
        accelerator = Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, opt)
    if variant == "local_optimizer":
        # constant rule, one round longer than the run: every step here is a local step
        opt = LocalOptimizer(opt, model, QSRConfig(qsr_rule="constant", qsr_h_base=10 * steps))
    times, cpu = [], []
    dist.barrier()
    for batch in data:
        t0, c0 = time.perf_counter(), time.process_time()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    synced = getattr(opt, "stats", None)
    dist.barrier()
    return {"times": times, "cpu": cpu, "syncs": None if synced is None else synced.syncs + synced.extra_syncs}


def _trainer(rank, world_size, variant, steps):
    import torch.distributed as dist
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = _model_and_data(rank, steps)
    # one sample per item; the Trainer's sampler hands each rank BATCH of them per step
    samples = [{k: v[i] for k, v in b.items()} for b in data for i in range(BATCH)]

    class Samples(Dataset):
        def __len__(self):
            return len(samples) * world_size

        def __getitem__(self, i):
            return samples[i % len(samples)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.t0, self.c0 = [], [], 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    timer = StepTimer()
    callbacks = [timer]
    if variant == "trainer_qsr":
        from qsr_hf import QSRConfig
        from qsr_hf.frontends.callback import QSRCallback

        # first, so that its on_step_end (a sync, if due) is inside the timed span
        callbacks.insert(0, QSRCallback(QSRConfig(qsr_rule="constant", qsr_h_base=10 * steps)))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,  # all parameters are used; True would add a per-step flag all-reduce
            average_tokens_across_devices=False,  # same in both variants (QSRCallback would switch it off anyway)
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Samples(), callbacks=callbacks)
        dist.barrier()
        trainer.train()
    return {"times": timer.times, "cpu": timer.cpu, "syncs": None}


def _worker(rank, world_size, variants, steps):
    out = {}
    for variant in variants:
        fn = _trainer if variant.startswith("trainer") else _loop
        out[variant] = fn(rank, world_size, variant, steps)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant and round, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics")
    parser.add_argument("--rounds", type=int, default=5, help="repeat all variants this many times, order rotated")
    args = parser.parse_args(argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    variants = list(LOOP_VARIANTS)
    skipped = {}
    try:
        import qsr_hf.frontends.callback  # noqa: F401
    except ImportError as e:
        skipped = dict.fromkeys(TRAINER_VARIANTS, f"qsr_hf.frontends.callback not importable: {e}")
    else:
        variants += TRAINER_VARIANTS

    samples = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for i in range(args.rounds):
        # rotate the order every round, so that load drift on a shared machine hits all variants alike
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        results = run_distributed(_worker, world_size=2, timeout=1800, variants=order, steps=args.steps)
        for v in variants:
            per_rank = [r[v]["times"][args.warmup : args.steps - 1] for r in results]  # last step: end-of-run sync
            samples[v] += [max(ts) for ts in zip(*per_rank, strict=True)]
            cpu[v] += [c for r in results for c in r[v]["cpu"][args.warmup : args.steps - 1]]
    med = {v: median(samples[v]) for v in variants}
    p10 = {v: quantile(samples[v], 0.1) for v in variants}
    cpu_med = {v: median(cpu[v]) for v in variants}
    record = {
        v: {
            "median_step_s": med[v],
            "ratio_to_bare": med[v] / med["bare"],
            "ratio_to_ddp": med[v] / med["ddp"],
            "ratio_to_trainer_ddp": med[v] / med["trainer_ddp"] if "trainer_ddp" in med else None,
            "p10_step_s": p10[v],
            "p10_ratio_to_bare": p10[v] / p10["bare"],
            "p10_ratio_to_ddp": p10[v] / p10["ddp"],
            "cpu_median_step_s": cpu_med[v],
            "cpu_ratio_to_bare": cpu_med[v] / cpu_med["bare"],
            "cpu_ratio_to_ddp": cpu_med[v] / cpu_med["ddp"],
            "steps_measured": len(samples[v]),
        }
        for v in variants
    }
    path = write_result(
        "step_overhead",
        {
            "setup": f"2 spawned processes, gloo over loopback, 1 thread each; ViT {VIT}, AdamW, batch {BATCH}/rank",
            "params": 3_191_562,
            "statistic": (
                "wall: median (and 10th percentile) over measured steps of the slower rank's step time; "
                "CPU: median over steps and ranks of the process CPU time per step (all threads, gloo's included)"
            ),
            "loadavg_at_start": load_at_start,
            "results": record,
            "skipped": skipped,
        },
    )
    print(f"machine: {machine_info()['cpu_model']}, {machine_info()['cpu_cores']} cores")
    rows = [
        [
            v,
            f"{1e3 * med[v]:.1f}",
            f"{record[v]['ratio_to_bare']:.2f}",
            f"{record[v]['ratio_to_ddp']:.2f}",
            "-" if record[v]["ratio_to_trainer_ddp"] is None else f"{record[v]['ratio_to_trainer_ddp']:.2f}",
            f"{1e3 * p10[v]:.1f}",
            f"{record[v]['p10_ratio_to_bare']:.2f}",
            f"{record[v]['p10_ratio_to_ddp']:.2f}",
            f"{1e3 * cpu_med[v]:.1f}",
            f"{record[v]['cpu_ratio_to_bare']:.2f}",
            f"{record[v]['cpu_ratio_to_ddp']:.2f}",
        ]
        for v in variants
    ]
    rows += [[v, "skipped", "-", "-", why, "-", "-", "-", "-", "-", "-"] for v, why in skipped.items()]
    print_table(
        [
            "variant",
            "wall median ms",
            "/ bare",
            "/ ddp",
            "/ trainer_ddp",
            "wall p10 ms",
            "p10 / bare",
            "p10 / ddp",
            "CPU ms",
            "CPU / bare",
            "CPU / ddp",
        ],
        rows,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
