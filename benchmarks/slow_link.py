"""Train one model over a slow link between two "hosts": data-parallel vs qsr_hf vs accelerate vs torch local SGD.

    sudo python benchmarks/slow_link.py       # 5.5 min on 2 cores; needs root (network namespaces, tc)

Two Linux network namespaces joined by a veth pair stand in for two hosts; each runs one training process
(``ip netns exec``), and gloo talks over the veth (``GLOO_SOCKET_IFNAME``). Both veth ends are shaped with ``tc``
(``netem`` rate + delay when the kernel has it, else ``tbf`` rate only, which is recorded). The namespaces are
created and deleted by this script; no other interface or address is touched. Not run in CI.

The same 10.5M-parameter MLP (synthetic teacher labels, AdamW, batch 16 per rank) is trained for ``--steps`` steps
with each method, one after the other, over each link setting:

- ``ddp``: `accelerator.prepare` (DistributedDataParallel), one gradient all-reduce per step.
- ``qsr``: `qsr_hf.LocalOptimizer` with the paper's ViT-B QSR schedule compressed to this run (below).
- ``constant_h4``: `qsr_hf.LocalOptimizer`, ``qsr_rule="constant"``, H = 4.
- ``qsr_overlap``, ``constant_h4_overlap``: the same with ``qsr_overlap_sync`` (each sync's all-reduce runs during the
  next step and is folded in after it); ``qsr_compress``: QSR with ``qsr_compress_delta`` (the round's change in
  bf16: an all-to-all and an all-gather, half the bytes); ``qsr_overlap3``, ``constant_h4_overlap3``: the average
  may take 3 steps to arrive (``qsr_overlap_steps=3``); ``qsr_overlap_auto``, ``constant_h4_overlap_auto``: the depth
  chosen from the first overlapped sync's measured times (``qsr_overlap_auto``); ``qsr_fragments4``,
  ``constant_h4_fragments4``: the model averaged in 4 fragments at staggered steps (``qsr_fragments=4``: with H = 4
  one fragment every step); ``qsr_fragments4_overlap_auto``, ``constant_h4_fragments4_overlap_auto``: both, each
  fragment's average in flight (Streaming DiLoCo's combination) at the automatic depth; ``qsr_int8``,
  ``qsr_int8ef``: the round's change in int8 with per-row fp32 scales (``qsr_compress_format="int8"``, the second
  with ``qsr_compress_error_feedback``); ``qsr_overlap_auto_int8``, ``qsr_fragments4_overlap_auto_int8``: int8
  combined with the overlap / fragments in flight. Not in the default run: ``--methods ... --name ...``.
- ``accelerate_localsgd``: `accelerate.local_sgd.LocalSGD(local_sgd_steps=4)`.
- ``torch_postlocal``: torch's `PostLocalSGDOptimizer` + `PeriodicModelAverager(period=4)` + DDP
  `post_localSGD_hook` (no gradient all-reduce after the switch); switch at the end of lr warm-up (an assumption:
  the paper does not give the switch point).

The compressed QSR schedule. The paper's ViT-B run: 93,600 steps, linear warm-up over 10,000 steps (10.7%), cosine
from peak 0.008 to 1e-6, H = max(4, floor((alpha / lr)^2)) with alpha = 0.0175. The lr schedule here has the same
shape in fractions of the run (warm-up 10.7%, cosine to peak / 8000), and alpha is scaled with the peak lr
(alpha = peak * 0.0175 / 0.008). Since H depends only on alpha / lr, the round that starts at any fraction of
training has the same length H (in steps) as the paper's round at that fraction, until the clip to the steps left;
e.g. the first round longer than H_base starts at 19-20% of training in both. What cannot be kept is the number of
long rounds: the paper's late rounds of 50-8,000 steps do not fit in a few hundred steps, so the tail here is a few
rounds clipped to the end. The resulting plan (23 syncs in 200 steps, 11.5%) is printed; alpha was not tuned to it.

Reported per link and method: wall time of the training loop (slower rank), ratio to ``ddp``, MB each rank put into
all-reduces by accounting (qsr_hf's `SyncStats`; the others computed from their schedules), MB sent on each veth
(``/sys/class/net/<veth>/statistics/tx_bytes``, read inside the namespace), the median step that did not
communicate ("local step": compute only, shows load from other processes), the time communicating steps took beyond
it ("comm extra"), and the final model's held-out loss (a sanity check, not a claim about accuracy). The method order
is rotated per link. Because the methods run one after the other and a shared machine's load changes meanwhile, each
run is also split into compute and communication and re-assembled with one common compute step time
("normalized wall", see `normalize`); on a quiet machine the raw and normalized ratios agree. Results go to ``benchmarks/results/slow_link.json``.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info, median, netns_parser, paper_lr_schedule, print_table, write_result


METHODS = ["ddp", "qsr", "constant_h4", "accelerate_localsgd", "torch_postlocal"]
VARIANTS = [
    "qsr_overlap",
    "constant_h4_overlap",
    "qsr_compress",
    "qsr_overlap3",
    "constant_h4_overlap3",
    "qsr_overlap_auto",
    "constant_h4_overlap_auto",
    "qsr_fragments4",
    "constant_h4_fragments4",
    "qsr_fragments4_overlap_auto",
    "constant_h4_fragments4_overlap_auto",
    "qsr_int8",
    "qsr_int8ef",
    "qsr_overlap_auto_int8",
    "qsr_fragments4_overlap_auto_int8",
]  # qsr_hf options (issues 14, 20), not run by default
PAPER = {"steps": 93_600, "warmup": 10_000, "peak_lr": 0.008, "min_lr": 1e-6, "alpha": 0.0175, "h_base": 4}
PEAK_LR = 1e-3
D_IN, HIDDEN, CLASSES, BATCH = 1024, 2048, 10, 16
UNSHAPED = "unshaped"  # --links value: no tc qdisc on the veth (the CPU-bound limit of a sync)
SUBNET = "10.233.0"  # private /30 that exists only inside the two namespaces this script creates


def schedule(steps):
    """The paper's lr shape and QSR alpha, compressed to ``steps`` (see the module docstring)."""
    warmup = round(steps * PAPER["warmup"] / PAPER["steps"])
    min_lr = PEAK_LR * PAPER["min_lr"] / PAPER["peak_lr"]
    alpha = PEAK_LR * PAPER["alpha"] / PAPER["peak_lr"]
    return paper_lr_schedule(steps, warmup, PEAK_LR, min_lr), warmup, alpha


# ---------------------------------------------------------------------------------------------------------------
# network namespaces (parent process, root)
# ---------------------------------------------------------------------------------------------------------------
def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class TwoHosts:
    """Two namespaces joined by one veth pair; deleted on exit (deleting a namespace deletes its veth end)."""

    def __init__(self):
        tag = os.getpid() % 100_000
        self.ns = [f"qsrbench{tag}a", f"qsrbench{tag}b"]
        self.dev = [f"qsv{tag}a", f"qsv{tag}b"]
        self.addr = [f"{SUBNET}.1", f"{SUBNET}.2"]
        self.netem = None

    def __enter__(self):
        try:
            for ns in self.ns:
                sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1])
            sh("ip", "link", "set", self.dev[1], "netns", self.ns[1])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr, strict=True):
                sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.__exit__()
            raise SystemExit(f"slow_link.py: could not set up the network namespaces: {e.stderr.strip()}") from e
        return self

    def __exit__(self, *exc):
        for ns in self.ns:
            sh("ip", "netns", "del", ns, check=False)

    def shape(self, rate, delay_ms):
        """Limit both directions to ``rate`` (tc syntax, e.g. 1gbit) with ``delay_ms`` one-way delay if possible."""
        notes = []
        if rate == UNSHAPED:  # the veth at its own speed: what is left of a sync's time is CPU, not the link
            for ns, dev in zip(self.ns, self.dev, strict=True):
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            qdisc = sh("ip", "netns", "exec", self.ns[0], "tc", "qdisc", "show", "dev", self.dev[0]).stdout.strip()
            return {"rate": rate, "delay_ms": 0.0, "qdisc": qdisc, "notes": ["no rate limit, no delay"]}
        for ns, dev in zip(self.ns, self.dev, strict=True):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root"]
            if self.netem is not False:
                r = sh(*tc, "netem", "delay", f"{delay_ms}ms", "rate", rate, "limit", "100000", check=False)
                self.netem = r.returncode == 0
                if not self.netem and "unknown" not in r.stderr:
                    raise SystemExit(f"slow_link.py: tc netem failed: {r.stderr.strip()}")
            if not self.netem:
                # tbf: rate only. burst >= rate x 2 ms so the token bucket is not the bottleneck at high rates
                burst = max(64_000, int(_rate_bps(rate) / 8 * 0.002))
                sh(*tc, "tbf", "rate", rate, "burst", str(burst), "latency", "50ms")
        if not self.netem:
            notes.append(
                f"the kernel has no sch_netem: rate limited with tbf, latency NOT emulated (asked {delay_ms} ms)"
            )
        qdisc = sh("ip", "netns", "exec", self.ns[0], "tc", "qdisc", "show", "dev", self.dev[0]).stdout.strip()
        return {"rate": rate, "delay_ms": delay_ms if self.netem else 0.0, "qdisc": qdisc, "notes": notes}


def normalize(methods, steps):
    """Add ``compute_step_s``, ``comm_s`` and ``normalized_wall_s`` to each method's record (see the README).

    The compute time of a step changes with the machine's load while the methods run one after the other; the
    communication time over the shaped link much less. So each run is split into compute (steps x its compute step
    time: the median non-communicating step for local methods, the calibration before/after the run for DDP, whose
    steps all communicate) and communication (the rest), and re-assembled with one common compute step time (the
    median over methods): ``normalized_wall_s = steps x common + comm_s``.
    """
    for m, r in methods.items():
        local = r["local_step_median_s"]
        r["compute_step_s"] = median(r["calibration_step_s"]) if m == "ddp" or math.isnan(local) else local
        r["comm_s"] = max(0.0, r["wall_s"] - steps * r["compute_step_s"])
    common = median([r["compute_step_s"] for r in methods.values()])
    for r in methods.values():
        r["normalized_wall_s"] = steps * common + r["comm_s"]
        r["common_compute_step_s"] = common


def _rate_bps(rate):
    if rate == UNSHAPED:
        return math.inf
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate must end with one of {list(units)}, got {rate!r}")


def run_pair(hosts, args, link, outdir, methods):
    port = 29_500 + os.getpid() % 1000
    procs, outs = [], []
    for rank in range(2):
        out = Path(outdir) / f"{link}_rank{rank}.json"
        outs.append(out)
        env = dict(
            os.environ,
            MASTER_ADDR=hosts.addr[0],
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            GLOO_SOCKET_IFNAME=hosts.dev[rank],
            ACCELERATE_USE_CPU="true",
            OMP_NUM_THREADS="1",
        )
        cmd = ["ip", "netns", "exec", hosts.ns[rank], sys.executable, __file__, "--worker", "--out", str(out)]
        cmd += ["--steps", str(args.steps), "--ifname", hosts.dev[rank], "--methods", *methods]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return wait_for_workers(procs, outs, args.timeout, f"slow_link.py (link {link})")


def wait_for_workers(procs, outs, timeout, label):
    """Wait for the worker processes (all killed past ``timeout`` s); return each one's JSON result, by rank."""
    deadline = time.time() + timeout
    logs = [""] * len(procs)
    for i, p in enumerate(procs):
        try:
            logs[i], _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{label}: workers did not finish within {timeout} s") from None
    for i, p in enumerate(procs):
        if p.returncode != 0:
            raise SystemExit(f"{label}: rank {i} failed:\n{logs[i][-4000:]}")
    return [json.loads(o.read_text()) for o in outs]


# ---------------------------------------------------------------------------------------------------------------
# training (worker process, inside a namespace)
# ---------------------------------------------------------------------------------------------------------------
def _counters(ifname):
    base = Path("/sys/class/net") / ifname / "statistics"
    return {k: int((base / k).read_text()) for k in ("tx_bytes", "rx_bytes", "tx_packets")}


def _mlp():
    from torch import nn

    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def _data(rank, steps):
    import torch

    teacher = torch.nn.Linear(D_IN, CLASSES)
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        batches = []
        for _ in range(steps):
            x = torch.randn(BATCH, D_IN, generator=g)
            batches.append((x, teacher(x).argmax(-1)))
        x_eval = torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(7))
        return batches, (x_eval, teacher(x_eval).argmax(-1))


def calibrate(batches, n=8):
    """Median time of a communication-free step on a scratch copy: the compute speed right now (the machine may be
    shared, and its load changes during a run)."""
    import torch

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR)
    times = []
    for x, y in batches[: n + 2]:
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return median(times[2:])


def train(method, rank, steps, ifname, accelerator):
    import torch
    import torch.distributed as dist
    from accelerate.local_sgd import LocalSGD
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    from qsr_hf import LocalOptimizer

    lrs, warmup, alpha = schedule(steps)
    batches, (x_eval, y_eval) = _data(rank, steps)
    torch.manual_seed(0)
    model = _mlp()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.999), weight_decay=0.05)
    # the scheduler stays on the raw optimizer: accelerate's prepared scheduler steps once per process per step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, steps - 1)] / PEAK_LR)
    model = accelerator.prepare(model)
    local_sgd, n_syncs = None, 0
    if method == "torch_postlocal":
        model.register_comm_hook(
            PostLocalSGDState(
                process_group=None, subgroup=None, start_localSGD_iter=warmup, post_local_gradient_allreduce=False
            ),
            post_localSGD_hook,
        )
        opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=4, warmup_steps=warmup))
        n_syncs = sum(1 for s in range(steps) if s >= warmup and (s - warmup) % 4 == 0)
        accounted = warmup * param_bytes + n_syncs * param_bytes
    elif method in ("qsr", "constant_h4", *VARIANTS):
        opt = LocalOptimizer(
            opt, model, method_config(method, alpha), num_training_steps=steps, num_warmup_steps=warmup
        )
    elif method == "accelerate_localsgd":
        local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=4)
        avg = local_sgd._sync_and_avg_model_params
        counter = [0]

        def counted():
            counter[0] += 1
            avg()

        local_sgd._sync_and_avg_model_params = counted  # count its syncs (the one at __exit__ included)
    elif method != "ddp":
        raise ValueError(method)

    dist.barrier()
    calib = [calibrate(batches)]
    dist.barrier()
    before = _counters(ifname)
    t0 = time.perf_counter()
    if local_sgd is not None:
        local_sgd.__enter__()
    step_s, comm_step = [], []
    overlap = opt.synchronizer.overlap if isinstance(opt, LocalOptimizer) else None
    for i, (x, y) in enumerate(batches):
        in_flight = overlap is not None and overlap.pending
        averaged = opt.stats.bytes_averaged if isinstance(opt, LocalOptimizer) else 0  # fragments average mid-round
        t_step = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if local_sgd is not None:
            local_sgd.step()
        step_s.append(time.perf_counter() - t_step)
        # did this step communicate (gradient all-reduce or parameter average)?
        if method == "ddp":
            comm_step.append(True)
        elif method == "torch_postlocal":
            comm_step.append(i < warmup or (i - warmup) % 4 == 0)
        elif method == "accelerate_localsgd":
            comm_step.append((i + 1) % 4 == 0)
        else:  # with overlap the step that folds an average in waits for what is left of its all-reduce
            folded = in_flight and (not overlap.pending or opt.last_step_synced)
            comm_step.append(opt.last_step_synced or folded or opt.stats.bytes_averaged != averaged)
    if local_sgd is not None:
        local_sgd.__exit__(None, None, None)
        n_syncs = counter[0]
        accounted = n_syncs * param_bytes
    if isinstance(opt, LocalOptimizer):
        opt.close()  # averages only if the last round is unfinished (it is not: rounds are clipped to the end)
        n_syncs = opt.stats.syncs + opt.stats.extra_syncs
        accounted = opt.stats.bytes_averaged
    if method == "ddp":
        n_syncs, accounted = steps, steps * param_bytes
    dist.barrier()
    wall = time.perf_counter() - t0
    after = _counters(ifname)
    calib.append(calibrate(batches))

    module = model.module
    with torch.no_grad():
        logits = module(x_eval)
        loss = torch.nn.functional.cross_entropy(logits, y_eval).item()
        acc = (logits.argmax(-1) == y_eval).float().mean().item()
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        diff = flat.clone()
        dist.all_reduce(diff)  # the ranks hold the same model iff flat == sum / 2
        max_diff = (flat - diff / 2).abs().max().item()
    del model, opt, module
    accelerator.free_memory()
    quiet = [t for t, c in zip(step_s, comm_step, strict=True) if not c]
    local_median = median(quiet) if quiet else float("nan")
    return {
        "wall_s": wall,
        # separates load noise from communication: the median step that did not communicate, and the time the
        # communicating steps took beyond such a step
        "local_step_median_s": local_median,
        "calibration_step_s": calib,
        "comm_step_median_s": median([t for t, c in zip(step_s, comm_step, strict=True) if c]),
        "comm_extra_s": sum(t - local_median for t, c in zip(step_s, comm_step, strict=True) if c) if quiet else None,
        "syncs": n_syncs,
        "overlap_steps": None if overlap is None else overlap.steps,  # qsr_overlap_auto: the depth it chose
        "accounted_bytes": accounted,
        "param_bytes": param_bytes,
        "iface": {k: after[k] - before[k] for k in after},
        "eval_loss": loss,
        "eval_acc": acc,
        "max_param_diff_between_ranks": max_diff,
    }


def method_config(method: str, alpha: float):
    """The QSRConfig a qsr_hf method name stands for: ``qsr`` or ``constant_h4``, then any of ``_fragmentsF``,
    ``_overlap`` / ``_overlapK`` / ``_overlap_auto``, and one wire format ``_compress`` (bf16), ``_int8`` or
    ``_int8ef`` (int8 with error feedback), in that order."""
    from qsr_hf import QSRConfig

    base = QSRConfig(qsr_alpha=alpha, qsr_h_base=4) if method.startswith("qsr") else QSRConfig(qsr_rule="constant")
    tokens = method.removeprefix("qsr").removeprefix("constant_h4").split("_")[1:]
    fields = {}
    while tokens:
        token = tokens.pop(0)
        if token.startswith("fragments"):
            fields["qsr_fragments"] = int(token.removeprefix("fragments"))
        elif token.startswith("overlap"):
            fields["qsr_overlap_sync"] = True
            if tokens and tokens[0] == "auto":
                fields["qsr_overlap_auto"] = bool(tokens.pop(0))
            elif token != "overlap":
                fields["qsr_overlap_steps"] = int(token.removeprefix("overlap"))
        elif token in ("compress", "int8", "int8ef"):
            fields["qsr_compress_delta"] = True
            fields["qsr_compress_format"] = "bf16" if token == "compress" else "int8"
            fields["qsr_compress_error_feedback"] = token == "int8ef"
        else:
            raise ValueError(f"unknown method token {token!r} in {method!r}")
    return dataclasses.replace(base, **fields)


def probe(param_numel, reps=3):
    """Time an all-reduce of one model's worth of fp32 over the link (what one sync costs)."""
    import torch
    import torch.distributed as dist

    buf = torch.ones(param_numel)
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return median(times[1:])


def worker(args):
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = Accelerator(cpu=True)
    numel = sum(p.numel() for p in _mlp().parameters())
    out = {"rank": rank, "allreduce_probe_s": probe(numel), "methods": {}}
    for method in args.methods:
        out["methods"][method] = train(method, rank, args.steps, args.ifname, accelerator)
    dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = netns_parser(__doc__, 200, METHODS, 900, "seconds per link setting", VARIANTS)
    parser.add_argument(
        "--links", nargs="+", default=["1gbit", "10gbit"], help=f"tc rates, e.g. 1gbit 10gbit, or {UNSHAPED}"
    )
    parser.add_argument("--delay-ms", type=float, default=0.5, help="one-way delay per direction (needs netem)")
    parser.add_argument("--name", default="slow_link", help="results/<name>.json")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    if os.geteuid() != 0:
        raise SystemExit(
            "slow_link.py needs root (CAP_NET_ADMIN) to create network namespaces and shape them with tc: "
            "run it with sudo. It is a manual benchmark and is not run in CI."
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"slow_link.py needs `{tool}` from iproute2: apt-get install iproute2")
    for rate in args.links:
        _rate_bps(rate)

    from qsr_hf import QSRConfig, plan
    from qsr_hf.analysis.scaling import implied_allreduce_seconds, ring_allreduce_seconds

    lrs, warmup, alpha = schedule(args.steps)
    qsr_plan = plan(QSRConfig(qsr_alpha=alpha, qsr_h_base=4), lrs, warmup)
    print(
        f"compressed QSR plan: {args.steps} steps, warm-up {warmup}, alpha {alpha:.4g} (= peak x 0.0175/0.008): "
        f"{qsr_plan.syncs} syncs ({qsr_plan.comm_volume_vs_ddp:.1%}), first round > 4 at step {qsr_plan.first_step_above(4)}; "
        f"rounds {qsr_plan.round_lengths}",
        flush=True,
    )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    links, rows = {}, []
    t_start = time.time()
    with TwoHosts() as hosts, tempfile.TemporaryDirectory() as tmp:
        for li, rate in enumerate(args.links):
            shaping = hosts.shape(rate, args.delay_ms)
            for note in shaping["notes"]:
                print(f"note: {note}", flush=True)
            k = li % len(args.methods)  # rotate the order per link: load drift does not always hit the same method
            order = args.methods[k:] + args.methods[:k]
            results = run_pair(hosts, args, rate, tmp, order)
            methods = {}
            for m in args.methods:
                per_rank = [r["methods"][m] for r in results]
                methods[m] = {
                    "wall_s": max(r["wall_s"] for r in per_rank),
                    "syncs": per_rank[0]["syncs"],
                    "overlap_steps": per_rank[0].get("overlap_steps"),  # qsr_overlap_auto: the depth chosen
                    "accounted_mb_per_rank": per_rank[0]["accounted_bytes"] / 1e6,
                    "iface_tx_mb_per_rank": [r["iface"]["tx_bytes"] / 1e6 for r in per_rank],
                    "local_step_median_s": max(r["local_step_median_s"] for r in per_rank),
                    "calibration_step_s": [
                        max(c) for c in zip(*(r["calibration_step_s"] for r in per_rank), strict=True)
                    ],
                    "comm_step_median_s": max(r["comm_step_median_s"] for r in per_rank),
                    "comm_extra_s": None
                    if per_rank[0]["comm_extra_s"] is None
                    else max(r["comm_extra_s"] for r in per_rank),
                    "eval_loss": per_rank[0]["eval_loss"],
                    "eval_acc": per_rank[0]["eval_acc"],
                    "max_param_diff_between_ranks": per_rank[0]["max_param_diff_between_ranks"],
                }
            param_bytes = results[0]["methods"][args.methods[0]]["param_bytes"]
            normalize(methods, args.steps)
            for r in methods.values():
                # per sync (DDP: per gradient all-reduce): what one rank put on the veth, and the time the syncs
                # added to the run beyond compute (normalize's comm_s: what the overlap did not hide)
                r["wire_mb_per_sync"] = sum(r["iface_tx_mb_per_rank"]) / 2 / r["syncs"]
                r["exposed_comm_s_per_sync"] = r["comm_s"] / r["syncs"]
                if "ddp" in methods:
                    r["ratio_to_ddp"] = r["wall_s"] / methods["ddp"]["wall_s"]
                    r["normalized_ratio_to_ddp"] = r["normalized_wall_s"] / methods["ddp"]["normalized_wall_s"]
                    r["tx_ratio_to_ddp"] = sum(r["iface_tx_mb_per_rank"]) / sum(methods["ddp"]["iface_tx_mb_per_rank"])
            check = {
                "ring_allreduce_s_at_rate": ring_allreduce_seconds(param_bytes, _rate_bps(rate), 2),
                "probe_allreduce_s": max(r["allreduce_probe_s"] for r in results),
            }
            if {"ddp", "qsr"} <= set(methods):
                check["implied_allreduce_s_from_ddp_vs_qsr"] = implied_allreduce_seconds(
                    methods["ddp"]["wall_s"], methods["qsr"]["wall_s"], args.steps, methods["qsr"]["syncs"]
                )
            links[rate] = {"shaping": shaping, "model_mb": param_bytes / 1e6, "methods": methods, "cost_model": check}
            for m, r in methods.items():
                rows.append(
                    [
                        rate,
                        m,
                        f"{r['wall_s']:.1f}",
                        f"{r.get('ratio_to_ddp', float('nan')):.2f}",
                        r["syncs"],
                        f"{r['accounted_mb_per_rank']:.0f}",
                        f"{sum(r['iface_tx_mb_per_rank']) / 2:.0f}",
                        f"{1e3 * r['compute_step_s']:.0f}",
                        f"{r['comm_s']:.1f}",
                        f"{r['wire_mb_per_sync']:.1f}",
                        f"{r['exposed_comm_s_per_sync']:.2f}",
                        f"{r['normalized_wall_s']:.1f}",
                        f"{r.get('normalized_ratio_to_ddp', float('nan')):.2f}",
                        f"{r['eval_loss']:.3f}",
                    ]
                )
            print(f"[{time.time() - t_start:.0f} s] link {rate} done", flush=True)

    path = write_result(
        args.name,
        {
            "setup": (
                f"2 network namespaces + veth, gloo, 1 thread per rank; MLP {D_IN}-{HIDDEN}x3-{CLASSES} "
                f"({param_bytes / 4e6:.1f}M params), AdamW peak lr {PEAK_LR}, batch {BATCH}/rank, {args.steps} steps"
            ),
            "qsr_plan": {
                "steps": args.steps,
                "warmup": warmup,
                "alpha": alpha,
                "syncs": qsr_plan.syncs,
                "comm_volume_vs_ddp": qsr_plan.comm_volume_vs_ddp,
                "round_lengths": qsr_plan.round_lengths,
            },
            "postlocal_switch_step": warmup,
            "loadavg_at_start": load_at_start,
            "total_s": time.time() - t_start,
            "links": links,
        },
    )
    print(f"machine: {machine_info()['cpu_model']}, {machine_info()['cpu_cores']} cores")
    print_table(
        [
            "link",
            "method",
            "wall s",
            "/ ddp",
            "syncs",
            "MB all-reduced/rank",
            "MB on veth/rank",
            "compute step ms",
            "comm s",
            "MB on veth/sync",
            "exposed s/sync",
            "normalized wall s",
            "norm. / ddp",
            "eval loss",
        ],
        rows,
    )
    print(f"wrote {path}")
    return None


if __name__ == "__main__":
    main()
