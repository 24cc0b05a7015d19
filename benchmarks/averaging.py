"""Time one parameter average across 2 gloo processes (loopback): qsr_hf vs accelerate vs torch vs the floor.

    python benchmarks/averaging.py            # 11M, 87M (ViT-B/16), 204M parameters; ~9 min, 15 GiB
    python benchmarks/averaging.py --quick    # 11M only

Methods, each averaging the same fp32 parameters of a model with ViT shapes:

- ``floor``: one ``all_reduce`` of one preallocated flat buffer of the same bytes (no division, no copies).
- ``floor_div``: the same plus the in-place division by the world size: the least an in-place *average* costs on gloo,
  which has no averaging reduce op.
- ``qsr_hf``: `qsr_hf.ParameterAverager.average()` (parameters are views of one flat buffer: all_reduce + div in place).
- ``qsr_hf_copy``: the same in copy mode (``mode="copy"``: tensors keep their storage; copy into a persistent send
  buffer, all_reduce, divide, copy back), as FSDP2 shards and the overlapped sync use it.
- ``qsr_hf_async``: in-place mode through ``average(async_op=True)`` then ``wait()`` at once: the handle's overhead.
- ``qsr_hf_copy_async``: copy mode, async, waited at once.
- ``torch_periodic``: `torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager(period=1)`
  (torch.cat into a new flat buffer, div, all_reduce, re-bind each ``p.data`` to a slice).
- ``accelerate_localsgd``: `accelerate.local_sgd.LocalSGD(local_sgd_steps=1).step()` (barrier, then per parameter
  clone + all_reduce + div, re-binding ``p.data``).
- ``per_param_inplace``: one in-place ``all_reduce`` per parameter (for reference: the per-call cost alone).
- ``qsr_hf_outer``: the ``qsr_hf`` average plus DiLoCo's Nesterov outer step (`qsr_hf.sync.synced_state.SyncedState`
  with `qsr_hf.sync.outer.OuterStep`: 8 bytes per parameter of state, the step streamed in 4M-value chunks).
- ``finite_check``: what qsr_hf's Synchronizer checks before averaging, on the ``qsr_hf`` row's buffers:
  `qsr_hf.sync.agreement.all_finite` (one fp32 sum per flat buffer), no communication.
- ``sync_checks``: ``finite_check`` plus the agreement all-gather (`qsr_hf.sync.agreement.exchange`, 14 int64 per rank):
  what a sync adds to the average when the checks run separately (compression, overlap, hierarchical, FSDP2). Its
  ratio to ``qsr_hf`` is the ``separate_checks_vs_average`` column.
- ``qsr_hf_checked``: a DDP sync's whole average with its checks riding on the collective
  (`qsr_hf.runtime.paths.average_with_header`: ``finite_check``, then the ``qsr_hf`` average with the agreement header
  appended to its buffer; no other collective). ``folded_checks_vs_average`` = (``qsr_hf_checked`` - ``qsr_hf``) /
  ``qsr_hf``: what the checks add to a sync now.

Memory: the methods share three model copies (one flat buffer for the floors, one model for every qsr_hf row, one for
the methods that re-bind ``p.data``), plus the outer step's 2 copies of state and copy mode's send buffer; with
transient copies (torch's averager concatenates, gloo's scratch) a rank peaked at 9.3 fp32 copies of the model above
its 0.4 GiB of imports (204M parameters: 7.5 GiB per rank, 15 GiB for the 2 ranks; before, one model per method: ~15
copies, 12.5 GiB per rank, killed for memory on a 24 GB machine). Each rank's peak (``ru_maxrss``) is recorded as
``peak_rss_gib_per_rank``. The methods are interleaved (order rotated every repetition) so that load
drift on a shared machine hits all of them alike. Reported: the median over ``--reps`` repetitions (after one warm-up
round) of the slower rank's time, and its ratio to the floor; also the minimum (best of N), which a loaded, shared
machine disturbs least. Results go to ``benchmarks/results/averaging.json``.
"""

import argparse
import os
import time
import warnings

from _common import machine_info, median, peak_rss_gib, print_table, run_distributed, write_result


SIZES = {
    # name: ViTConfig overrides (ViTForImageClassification, 1000 classes)
    "vit_s6_11M": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit_b16_87M": {},  # transformers' ViTConfig defaults are ViT-B/16
    "vit_l16x16_204M": {
        "hidden_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}
METHODS = [
    "floor",
    "floor_div",
    "qsr_hf",
    "qsr_hf_copy",
    "qsr_hf_async",
    "qsr_hf_copy_async",
    "qsr_hf_outer",
    "torch_periodic",
    "accelerate_localsgd",
    "per_param_inplace",
    "finite_check",
    "sync_checks",
    "qsr_hf_checked",
]


def vit_shapes(overrides: dict) -> list[tuple[int, ...]]:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(num_labels=1000, **overrides))
    return [tuple(p.shape) for p in model.parameters()]


def _worker(rank, world_size, shapes, reps, methods):
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.local_sgd import LocalSGD
    from torch import nn
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from qsr_hf import ParameterAverager
    from qsr_hf.runtime.paths import average_with_header
    from qsr_hf.sync.agreement import COMMON, all_finite, exchange, layout_fingerprint
    from qsr_hf.sync.outer import OuterStep
    from qsr_hf.sync.synced_state import SyncedState

    def agreement_values(averager):
        # what a sync computes: fixed values, and the layout fingerprint of the averaged tensors (hashed each sync)
        return [0] * (len(COMMON) - 1) + [layout_fingerprint(averager.tensors)]

    accelerator = Accelerator(cpu=True)
    zero = torch.zeros(1)
    base_rss_gib = peak_rss_gib()  # the imports (torch, transformers, accelerate), before any model copy

    def make_model():
        model = nn.Module()
        model.params = nn.ParameterList(nn.Parameter(torch.empty(s).uniform_(-1, 1) + rank) for s in shapes)
        # PeriodicModelAverager only averages parameters that have a gradient: a zero-stride one costs no memory
        for p in model.parameters():
            p.grad = zero.expand(p.shape)
        return model

    # Three model copies in all, not one per method (issue 29: at 204M parameters a model per method held ~15 model
    # copies per rank and the kernel killed the run on a 24 GB machine). Each method only needs its own buffers, not
    # its own values: timings do not depend on the values, and every method leaves the ranks equal.
    # - one flat buffer for both floors;
    # - model "qsr" for every qsr_hf row: the in-place averager (its flat buffers), the async rows and the checks on
    #   it, the outer step's synced state on its buckets (+2 copies), and copy mode over the same tensors (+1 send
    #   buffer; copy mode leaves the tensors' storage where it is, so the in-place averager's views stay valid);
    # - model "rebind" for the methods that re-bind ``p.data`` or work per parameter (torch's averager, accelerate,
    #   per-parameter all_reduce): each works on whatever storage the parameters have when it runs.
    uses = {"torch_periodic": "rebind", "accelerate_localsgd": "rebind", "per_param_inplace": "rebind"}
    models = {name: make_model() for name in {uses.get(m, "qsr") for m in methods if not m.startswith("floor")}}
    numel = sum(p.numel() for p in next(iter(models.values())).parameters())
    floor = torch.ones(numel) if any(m.startswith("floor") for m in methods) else None
    ops, averagers, build_s = {}, {}, None
    for method in methods:
        model = models.get(uses.get(method, "qsr"))
        if method == "floor":
            ops[method] = lambda floor=floor: dist.all_reduce(floor)
        elif method == "floor_div":

            def all_reduce_div(buf=floor):
                dist.all_reduce(buf)
                buf.div_(world_size)

            ops[method] = all_reduce_div
        elif method in ("qsr_hf", "qsr_hf_copy"):  # qsr_hf first: copy mode reads the tensors it re-bound
            t0 = time.perf_counter()
            averagers[method] = ParameterAverager(
                list(model.parameters()), mode="copy" if "copy" in method else "inplace"
            )
            build_s = build_s or time.perf_counter() - t0
            ops[method] = averagers[method].average
        elif method == "qsr_hf_outer":
            averager = averagers["qsr_hf"]
            averager.average()  # untimed: the anchor (synced values) must be equal on every rank, as in training
            state = SyncedState(averager.buckets, OuterStep(nesterov=True, lr=0.7, momentum=0.9))
            ops[method] = lambda averager=averager, state=state: averager.average(transform=state.advance)
        elif method == "finite_check":
            ops[method] = lambda averager=averagers["qsr_hf"]: all_finite([b.flat for b in averager.buckets])
        elif method == "sync_checks":

            def checks(averager=averagers["qsr_hf"]):
                finite = all_finite([b.flat for b in averager.buckets])
                exchange(agreement_values(averager), [int(not finite)])

            ops[method] = checks
        elif method == "qsr_hf_checked":

            def unhealthy(finite):
                raise RuntimeError(f"the benchmark's ranks disagree (this rank finite: {finite})")

            def checked(averager=averagers["qsr_hf"]):
                storage = [b.flat for b in averager.buckets]
                average_with_header(averager, agreement_values(averager), storage, unhealthy)

            ops[method] = checked
        elif method in ("qsr_hf_async", "qsr_hf_copy_async"):
            blocking = averagers[method.removesuffix("_async")]  # the blocking row's averager (same buffers)
            ops[method] = lambda averager=blocking: averager.average(async_op=True).wait()
        elif method == "torch_periodic":
            with warnings.catch_warnings():  # "period 1: use DDP instead" - we time one average on purpose
                warnings.simplefilter("ignore", UserWarning)
                averager = PeriodicModelAverager(period=1, warmup_steps=0)
            ops[method] = lambda averager=averager, model=model: averager.average_parameters(model.parameters())
        elif method == "accelerate_localsgd":
            ops[method] = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1).step
        elif method == "per_param_inplace":

            def per_param(model=model):
                for p in model.parameters():
                    dist.all_reduce(p.data)
                    p.data.div_(world_size)

            ops[method] = per_param
        else:
            raise ValueError(method)

    def equal_across_ranks(model) -> bool:  # one value per parameter (a double sum), compared across ranks
        check = torch.stack([p.detach().double().sum() for p in model.parameters()])
        gathered = [torch.zeros_like(check) for _ in range(world_size)]
        dist.all_gather(gathered, check)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # interleave the methods, rotating their order, so that load drift on a shared machine hits all of them alike
    times, equal = {m: [] for m in methods}, {}
    for i in range(reps + 1):  # round 0 is a warm-up
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for method in order:
            dist.barrier()
            t0 = time.perf_counter()
            ops[method]()
            dt = time.perf_counter() - t0
            if i:
                times[method].append(dt)
            if i == reps and not method.startswith("floor"):  # sanity, untimed: the ranks hold the same model after it
                equal[method] = equal_across_ranks(models[uses.get(method, "qsr")])
    return {
        "peak_rss_gib": peak_rss_gib(),
        "base_rss_gib": base_rss_gib,
        "numel": numel,
        "num_tensors": len(shapes),
        "times": times,
        "qsr_hf_build_s": build_s,
        "equal_after": equal,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per method (after 1 warm-up)")
    parser.add_argument("--quick", action="store_true", help="smallest model only")
    parser.add_argument("--sizes", nargs="*", default=None, choices=list(SIZES))
    parser.add_argument("--name", default="averaging", help="results/<name>.json")
    args = parser.parse_args(argv)
    sizes = args.sizes or (["vit_s6_11M"] if args.quick else list(SIZES))

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    rows, records = [], []
    for name in sizes:
        shapes = vit_shapes(SIZES[name])
        results = run_distributed(_worker, world_size=2, timeout=1800, shapes=shapes, reps=args.reps, methods=METHODS)
        numel = results[0]["numel"]
        # per repetition, the slower rank decides; then the median over repetitions
        slower = {m: [max(ts) for ts in zip(*(r["times"][m] for r in results), strict=True)] for m in METHODS}
        med = {m: median(slower[m]) for m in METHODS}
        best = {m: min(slower[m]) for m in METHODS}
        record = {
            "model": name,
            "params": numel,
            "tensors": results[0]["num_tensors"],
            "mbytes_fp32": numel * 4 / 1e6,
            "median_s": med,
            "ratio_to_floor": {m: med[m] / med["floor"] for m in METHODS},
            "min_s": best,
            "min_ratio_to_floor": {m: best[m] / best["floor"] for m in METHODS},
            "separate_checks_vs_average": med["sync_checks"] / med["qsr_hf"],
            "folded_checks_vs_average": (med["qsr_hf_checked"] - med["qsr_hf"]) / med["qsr_hf"],
            "finite_check_vs_average": med["finite_check"] / med["qsr_hf"],
            "outer_vs_average": med["qsr_hf_outer"] / med["qsr_hf"],
            "floor_gbit_per_s": numel * 4 * 8 / med["floor"] / 1e9,
            "qsr_hf_one_time_build_s": max(r["qsr_hf_build_s"] for r in results),
            "params_equal_across_ranks_after": all(all(r["equal_after"].values()) for r in results),
            # the methods after whose last call (in the last round) the ranks' models differed
            "unequal_after": sorted({m for r in results for m, ok in r["equal_after"].items() if not ok}),
            # peak resident memory of each rank's process (ru_maxrss), the part of it before any model copy (the
            # imports), and the rest in fp32 copies of the model
            "peak_rss_gib_per_rank": [round(r["peak_rss_gib"], 2) for r in results],
            "base_rss_gib_per_rank": [round(r["base_rss_gib"], 2) for r in results],
            "peak_model_copies": round(
                max(r["peak_rss_gib"] - r["base_rss_gib"] for r in results) * 2**30 / (numel * 4), 1
            ),
            "samples_s": {m: [r["times"][m] for r in results] for m in METHODS},
        }
        records.append(record)
        rows.append(
            [name, f"{numel / 1e6:.1f}M", "median", *(f"{med[m]:.3f} ({med[m] / med['floor']:.2f}x)" for m in METHODS)]
        )
        rows.append(["", "", "min", *(f"{best[m]:.3f} ({best[m] / best['floor']:.2f}x)" for m in METHODS)])

    path = write_result(
        args.name,
        {
            "setup": "2 spawned processes, gloo over loopback, 1 thread each, fp32 parameters with ViT shapes",
            "reps": args.reps,
            "loadavg_at_start": load_at_start,
            "statistic": "median (and min) over reps of the slower rank's time, after 1 warm-up round",
            "results": records,
        },
    )
    print(f"machine: {machine_info()['cpu_model']}, {machine_info()['cpu_cores']} cores; seconds (ratio to floor)")
    print_table(["model", "params", "stat", *METHODS], rows)
    for record in records:
        print(
            f"{record['model']}: checks riding on the average add {record['folded_checks_vs_average']:.1%} to it "
            f"(of which the NaN/inf read pass {record['finite_check_vs_average']:.1%}); run separately with their "
            f"all-gather {record['separate_checks_vs_average']:.1%}; "
            f"average + Nesterov outer step = {record['outer_vs_average']:.2f}x the average; peak memory per rank "
            f"{max(record['peak_rss_gib_per_rank']):.2f} GiB ({record['peak_model_copies']} model copies above the imports)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
