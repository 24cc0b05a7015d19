"""Input pipeline throughput: images per second per CPU core of each stage of the recipes' training transform, for
both RandAugment paths, and images per second of the batched augmentation on a device.

Realistic JPEGs: Fashion-MNIST garments (or scikit-learn digits without it) upscaled to 500x375 on a colored
gradient with sensor-like noise, saved at quality 90 (the official code's ffcv files: max side 500, quality 90).
One process pinned to one core (``os.sched_setaffinity``), torch and PIL single-threaded, best of ``--repeats``
passes over the images (the machine may be shared: the best pass is the least disturbed one). Stages:

- ``decode``: full JPEG decode to RGB (the floor of any PIL pipeline);
- ``decode + crop/resize``: RandomResizedCrop to 224 on uint8 (JPEG draft decoding where the crop allows);
- ``RandAugment``: composer's op set, depth 2, severity 10, on the 224x224 crop, per image with Pillow;
- ``flip + to uint8 tensor``, ``collate + normalize`` (uint8 -> normalized float32, batches of 256);
- ``loader, RandAugment per image``: `ImageDataset` rows from a `datasets` table of JPEG bytes + the normalizing
  collator (the CPU path);
- ``loader, RandAugment on the device``: the same with ``randaugment_on_device`` (the loader draws the ops) and a
  uint8 collator: the CPU work left per image when the device augments;
- ``batched RandAugment + normalize``: [`DeviceAugmentation`] on batches of 256 on ``--device`` (img/s per core on
  the CPU, per GPU on CUDA), after checking that its output equals the per-image path's on every image.

    python benchmarks/input_pipeline.py [--images 300] [--repeats 3] [--workers 2] [--device auto] [--results PATH]

Writes benchmarks/results/input_pipeline.json (or ``--results``).
"""

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import plots
import torch
from _common import machine_info
from PIL import Image

from qsr_hf.training import batched_randaugment, data, randaugment, transforms


RESULTS = Path(__file__).parent / "results" / "input_pipeline.json"
GOAL_PER_CORE = 375  # 3,000 img/s per GPU from 8 cores


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` 500x375 JPEGs (quality 90) of upscaled Fashion-MNIST garments on noisy colored gradients."""
    rng = np.random.default_rng(seed)
    garments = np.asarray(data.load_fashion_mnist("train", max_samples=n).with_format("numpy")["image"], np.uint8)
    y, x = np.mgrid[0:375, 0:500] / 500.0
    out = []
    for garment in garments:
        base, tilt = rng.uniform(40, 200, 3), rng.uniform(-60, 60, 3)
        canvas = base + tilt * (x[..., None] + y[..., None]) / 2
        cloth = np.asarray(Image.fromarray(garment).resize((340, 340), Image.Resampling.BICUBIC), np.float32) / 255
        tint = rng.uniform(0.3, 1.0, 3) * 255
        left = int(rng.integers(0, 160))
        region = canvas[17:357, left : left + 340]
        canvas[17:357, left : left + 340] = region * (1 - cloth[..., None]) + tint * cloth[..., None]
        canvas += rng.normal(0, 6, canvas.shape)
        buffer = io.BytesIO()
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def rate(fn: Callable[[Any], Any], items: list[Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Best items per second of ``fn`` over ``items`` in ``repeats`` passes."""
    best = 0.0
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for item in items:
            fn(item)
        sync()
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def loader_rate(ds: data.ImageDataset, collate: transforms.ImageCollator, workers: int, batches: int = 6) -> float:
    """img/s of a DataLoader with ``workers`` processes, batches of 64, after one warm-up batch per worker."""
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=64 * (batches + max(workers, 1)))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate, sampler=sampler)
    it = iter(loader)
    for _ in range(max(workers, 1)):
        next(it)
    start = time.perf_counter()
    count = sum(next(it)["pixel_values"].shape[0] for _ in range(batches))
    return count / (time.perf_counter() - start)


def main() -> None:
    """Measure every stage and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="passes per stage; the best one counts")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader measurement")
    parser.add_argument("--device", default="auto", help="device of the batched augmentation (auto: cuda if any)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON")
    cli = parser.parse_args()
    device = torch.device(
        "cuda" if cli.device == "auto" and torch.cuda.is_available() else cli.device.replace("auto", "cpu")
    )
    load_start = os.getloadavg()
    core = max(os.sched_getaffinity(0))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    jpegs = make_jpegs(cli.images)
    rng = np.random.default_rng(0)
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    per_image = transforms.TrainTransform(224, randaugment_depth=2, randaugment_severity=10)
    deferred = transforms.TrainTransform(224, randaugment_depth=2, randaugment_severity=10, randaugment_on_device=True)

    def decode(b: bytes) -> Image.Image:
        return Image.open(io.BytesIO(b)).convert("RGB")

    def crop(b: bytes, draft: bool = True) -> Image.Image:
        image = transforms.open_image({"bytes": b})
        box = transforms.random_resized_crop_box(*image.size, rng)
        return transforms.crop_resize(image, box, 224, "RGB", draft)

    crops = [crop(b) for b in jpegs]
    tensors = [transforms.to_uint8_tensor(c) for c in crops]
    collate = transforms.ImageCollator(mean, std)
    collate_uint8 = transforms.ImageCollator(mean, std, normalize=False)
    rows = [{"pixel_values": t, "labels": 0} for t in tensors[:256]]
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in jpegs], "label": [0] * len(jpegs)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])}),
    )
    cpu_path, device_path = data.ImageDataset(table, per_image, seed=0), data.ImageDataset(table, deferred, seed=0)
    batch = list(range(len(jpegs)))
    n = cli.repeats

    stages = {
        "decode (full JPEG to RGB)": rate(decode, jpegs, n),
        "decode + RandomResizedCrop 224, no draft": rate(lambda b: crop(b, draft=False), jpegs, n),
        "decode + RandomResizedCrop 224 (draft)": rate(crop, jpegs, n),
        "RandAugment (depth 2, severity 10) on 224x224, Pillow": rate(
            lambda c: randaugment.rand_augment(c, rng, 2, 10), crops, n
        ),
        "flip + to uint8 tensor": rate(
            lambda c: transforms.to_uint8_tensor(c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), crops, n
        ),
        "collate + normalize (per image, batches of 256)": rate(lambda _: collate(rows), [None] * 5, n) * len(rows),
        "loader, RandAugment per image (ImageDataset + normalizing collator)": rate(
            lambda _: collate(cpu_path.__getitems__(batch)), [None], n
        )
        * len(batch),
        "loader, RandAugment on the device (ImageDataset + uint8 collator)": rate(
            lambda _: collate_uint8(device_path.__getitems__(batch)), [None], n
        )
        * len(batch),
    }
    eval_tf = transforms.EvalTransform(224)
    stages["evaluation transform (decode + center crop 224)"] = rate(lambda b: eval_tf({"bytes": b}), jpegs, n)

    # the batched path: same ops as the per-image path, checked image by image, then timed on the device
    expected = collate(cpu_path.__getitems__(batch))["pixel_values"]
    shipped = collate_uint8(device_path.__getitems__(batch))
    augment = batched_randaugment.DeviceAugmentation(mean, std)
    pixels, ops = shipped["pixel_values"].to(device), shipped["randaugment"].to(device)
    equal = (augment(pixels, ops).cpu() == expected).flatten(1).all(1)
    chunks = [(pixels[i : i + 256], ops[i : i + 256]) for i in range(0, len(batch), 256)]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    batched = rate(lambda c: augment(*c), chunks, n, sync) * len(batch) / len(chunks)
    os.sched_setaffinity(0, allowed)
    loader = {w: loader_rate(device_path, collate_uint8, w) for w in sorted({1, cli.workers})}
    mean_kb = statistics.mean(len(b) for b in jpegs) / 1024
    result = {
        "images": len(jpegs),
        "jpeg": f"500x375, quality 90, mean {mean_kb:.0f} KiB",
        "img_per_s_per_core": {k: round(v, 1) for k, v in stages.items()},
        "batched_randaugment_normalize": {
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "img_per_s": round(batched, 1),
            "per": "core (1 thread)" if device.type == "cpu" else "GPU",
            "batch": min(256, len(batch)),
            "images_equal_to_per_image_path": f"{int(equal.sum())} of {len(batch)}",
        },
        "dataloader_img_per_s_randaugment_on_device": {f"{w} workers": round(v, 1) for w, v in loader.items()},
        "goal_per_core": GOAL_PER_CORE,
        "repeats": n,
        "pinned_core": core,
        "machine": machine_info(),
        "load_average_1min_at_start": round(load_start[0], 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "command": " ".join(["python benchmarks/input_pipeline.py", *sys.argv[1:]]),
    }
    cli.results.parent.mkdir(parents=True, exist_ok=True)
    cli.results.write_text(json.dumps(result, indent=2) + "\n")
    plots.draw("input_pipeline", cli.results)
    for name, value in stages.items():
        print(f"{name:<70} {value:8.0f} img/s per core")
    info = result["batched_randaugment_normalize"]
    print(f"{'batched RandAugment + normalize on ' + info['device']:<70} {batched:8.0f} img/s per {info['per']}")
    print(f"images equal to the per-image path: {info['images_equal_to_per_image_path']}")
    for name, value in result["dataloader_img_per_s_randaugment_on_device"].items():
        print(f"{'DataLoader (RandAugment on the device), ' + name:<70} {value:8.0f} img/s")


if __name__ == "__main__":
    main()
