"""One-command GPU check (issue 14.2): what a QSR run costs on the GPU at hand. Run it through ``gpu_check.sh``.

    bash benchmarks/gpu_check.sh            # ViT-B/16 (86.6M parameters), bf16; fits 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --tiny   # the same sections on a tiny model, on CPU when there is no GPU (~30 s)

Sections, each recorded in ``results/gpu_check.json`` (``gpu_check_tiny.json`` with ``--tiny``); a section that
cannot run here is recorded as ``{"skipped": reason}`` and the others still run:

- ``step_world1``: `Trainer` training steps (bf16 autocast, AdamW, synthetic images) without and with `QSRCallback`
  (constant H = 4), one process: median and mean step time of the timed steps, images per second.
- ``step_world2``: the same with 2 processes on one device (gloo: NCCL refuses two ranks on one GPU): DDP without the
  callback vs local steps with a sync every 4 steps.
- ``sync_local_work``: one sync's local work on the model's parameters held in bf16 in a 1-rank group (NCCL on a
  GPU, gloo on CPU), where the collective moves nothing: `ParameterAverager.average()` in place and in copy mode,
  and its parts (fp32 up-cast, division, copy-back, copy-in, finite check, checksum for an agreement check).
- ``nccl_avg``: NCCL all-reduce with ``ReduceOp.AVG`` vs ``SUM`` + divide on the model's bytes (needs 2 GPUs).
- ``input_pipeline``: ``benchmarks/input_pipeline.py``, when that script exists.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common
from _common import median, run_distributed, write_result


HERE = Path(__file__).resolve().parent
SIZES = {  # --tiny / full: model, image side, batch per process, timed steps, warm-up steps, repetitions
    True: {"model": "demo_vit", "image_size": 28, "batch": 4, "steps": 4, "warmup": 2, "reps": 3},
    False: {"model": "simple_vit_b16", "image_size": 224, "batch": 128, "steps": 20, "warmup": 5, "reps": 20},
}


def _on_gpu(rank: int) -> "object":
    """Use the GPU (both ranks on device 0 when there is one GPU) and undo the CPU forcing of the spawned runner."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    os.environ.pop("ACCELERATE_USE_CPU", None)
    local = rank % torch.cuda.device_count()
    os.environ["LOCAL_RANK"] = str(local)
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(size: dict, model: str | None):
    from qsr_hf.training.models import build_model

    labels = [str(i) for i in range(1000)]
    return build_model(model or size["model"], labels, image_size=size["image_size"], num_channels=3)


def _steps(rank, world_size, size, model, out_dir):
    """Trainer steps without and with QSRCallback in this process group; step times from on_step_begin/end."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qsr_hf import QSRCallback, QSRConfig

    device = _on_gpu(rank)

    class Images(torch.utils.data.Dataset):
        def __init__(self):
            self.pixels = torch.randn(3, size["image_size"], size["image_size"])

        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            return {"pixel_values": self.pixels, "labels": i % 1000}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)

    out = {}
    for variant in ("without_callback", "with_callback"):
        torch.manual_seed(0)
        timer = StepTimer()
        callbacks = [QSRCallback(QSRConfig(qsr_rule="constant", qsr_h_base=4))] if variant == "with_callback" else []
        args = TrainingArguments(
            output_dir=out_dir,
            use_cpu=device.type == "cpu",
            bf16=True,
            max_steps=size["warmup"] + size["steps"],
            per_device_train_batch_size=size["batch"],
            learning_rate=1e-3,
            warmup_steps=1,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            ddp_backend="gloo" if world_size > 1 else None,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0 if size["batch"] < 16 else 4,
        )
        trainer = Trainer(model=_build(size, model), args=args, train_dataset=Images(), callbacks=[*callbacks, timer])
        trainer.train()
        timed = timer.times[size["warmup"] :]
        out[variant] = {
            "median_step_s": median(timed),
            "mean_step_s": sum(timed) / len(timed),
            "images_per_s_per_process": size["batch"] / (sum(timed) / len(timed)),
            "step_s": timed,
        }
    out["with_over_without_mean"] = out["with_callback"]["mean_step_s"] / out["without_callback"]["mean_step_s"]
    out["device"], out["world_size"] = str(device), world_size
    return out


def _timed(fn, device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def _sync_local_work(rank, world_size, size, model):
    import torch
    import torch.distributed as dist

    from qsr_hf.sync.agreement import all_finite
    from qsr_hf.sync.averaging import ParameterAverager
    from qsr_hf.sync.tensor_selection import averaged_tensors

    device = _on_gpu(rank)
    torch.set_grad_enabled(False)
    group = dist.new_group(backend="nccl") if device.type == "cuda" else None
    out = {"device": str(device), "backend": dist.get_backend(group), "median_s": {}}
    for mode in ("inplace", "copy"):
        net = _build(size, model).to(device=device, dtype=torch.bfloat16)
        averager = ParameterAverager(averaged_tensors(net, average_buffers=True), group, mode=mode)
        out["median_s"][f"average_{mode}"] = _timed(averager.average, device, size["reps"])
        out["params"] = sum(b.flat.numel() for b in averager.buckets)
        if mode == "inplace":
            flat = averager.buckets[0].flat
            wide = flat.to(torch.float32)
            parts = {
                "upcast_fp32": lambda flat=flat: flat.to(torch.float32),
                "divide": lambda wide=wide: wide.div_(1),
                "copy_back": lambda flat=flat, wide=wide: flat.copy_(wide),
                "finite_check": lambda flat=flat: all_finite([flat]),  # what the Synchronizer runs before a sync
                "checksum_fp64": lambda wide=wide: float(wide.sum(dtype=torch.float64)),
            }
        else:
            b = averager.buckets[0]
            parts = {"copy_in": lambda b=b: b.gather(b.flat), "copy_out": lambda b=b: b.scatter(b.flat)}
        out["median_s"].update({k: _timed(f, device, size["reps"]) for k, f in parts.items()})
    return out


def _one_process(rank, world_size, size, model, out_dir):
    """The 1-process sections in one spawned process (one start-up instead of two)."""
    return {
        "step_world1": _section("step_world1", _steps, rank, world_size, size, model, out_dir),
        "sync_local_work": _section("sync_local_work", _sync_local_work, rank, world_size, size, model),
    }


def _nccl_avg(rank, world_size, size, model):
    import torch
    import torch.distributed as dist

    device = _on_gpu(rank)
    group = dist.new_group(backend="nccl")
    numel = sum(p.numel() for p in _build(size, model).parameters())
    buf = torch.ones(numel, device=device)

    def sum_div():
        dist.all_reduce(buf, group=group)
        buf.div_(world_size)

    avg = lambda: dist.all_reduce(buf, op=dist.ReduceOp.AVG, group=group)  # noqa: E731
    return {
        "params": numel,
        "median_s": {k: _timed(f, device, size["reps"]) for k, f in [("sum_div", sum_div), ("avg", avg)]},
    }


def _section(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - a section that fails is recorded with its reason; the others still run
        out = {
            "skipped": f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}",
            "traceback": traceback.format_exc()[-2000:],
        }
    out["section_s"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {'skipped: ' + out['skipped'] if 'skipped' in out else 'done'} ({out['section_s']} s)", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and few steps (the CPU test path)")
    parser.add_argument(
        "--model",
        default=None,
        help="qsr_hf.training.models.MODEL_TYPES key (default simple_vit_b16, the paper's ViT-B/16)",
    )
    parser.add_argument("--results-dir", default=None, help="where the json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    import torch

    if args.results_dir:
        _common.RESULTS_DIR = Path(args.results_dir)
    size = SIZES[args.tiny]
    gpus = torch.cuda.device_count()
    out_dir = tempfile.mkdtemp(prefix="gpu_check_trainer_")  # Trainer wants an output_dir; nothing is saved
    kwargs = {"size": size, "model": args.model}
    results = _section("one_process", lambda: run_distributed(_one_process, 1, 600, out_dir=out_dir, **kwargs)[0])
    if "skipped" in results:  # the process itself failed: both of its sections say why
        results = {"step_world1": results, "sync_local_work": results}
    results.pop("section_s", None)
    sections = {
        "step_world2": lambda: run_distributed(_steps, 2, 600, out_dir=out_dir, **kwargs)[0],
        "nccl_avg": (lambda: run_distributed(_nccl_avg, 2, 300, **kwargs)[0])
        if gpus >= 2
        else (lambda: {"skipped": f"NCCL needs one GPU per rank: {gpus} GPU(s) here"}),
        "input_pipeline": (lambda: {"skipped": "tiny mode: run benchmarks/input_pipeline.py on its own"})
        if args.tiny
        else _input_pipeline,
    }
    results.update({name: _section(name, fn) for name, fn in sections.items()})
    path = write_result(
        "gpu_check_tiny" if args.tiny else "gpu_check",
        {"tiny": args.tiny, "model": args.model or size["model"], "size": size, "gpus": gpus, **results},
    )
    print(f"wrote {path}")


def _input_pipeline() -> dict:
    script = HERE / "input_pipeline.py"
    if not script.exists():
        return {"skipped": "benchmarks/input_pipeline.py does not exist in this checkout"}
    proc = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=240)
    return {"returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}


if __name__ == "__main__":
    main()
