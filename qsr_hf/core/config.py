"""`QSRConfig`: every QSR knob, its default, help text and check. The single place for defaults."""

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from qsr_hf.core.config_checks import check_options
from qsr_hf.core.field_checks import check_field_types
from qsr_hf.core.schedules import ConstantSchedule, PostLocalSchedule, PowerSchedule, SyncSchedule


RULE_EXPONENTS: dict[str, int] = {"linear": 1, "qsr": 2, "cubic": 3}
Rule = Literal["qsr", "linear", "cubic", "constant", "post_local", "ddp"]
Worker = Literal["process", "node"]
OnNonfinite = Literal["error", "skip_rank"]
OuterOptimizer = Literal["none", "sgd", "nesterov"]
OuterScaling = Literal["none", "round_lr"]
CompressFormat = Literal["bf16", "int8", "fp8"]
RULES: list[str] = list(typing.get_args(Rule))
# how a checkpoint is resumed, not what is trained: left out of the fingerprint that state files record, so toggling
# it keeps a checkpoint readable (and fingerprints of configs from before the field existed unchanged)
RESUME_POLICY = ("qsr_elastic_resume",)
# fields added after checkpoints existed, at their default: left out of the fingerprint (older checkpoints stay readable)
OMITTED_AT_DEFAULT = {("qsr_compress_format", "bf16"), ("qsr_compress_error_feedback", False)}


@dataclass
class QSRConfig:
    """Configuration of QSR local training, shared by `QSRCallback`, `LocalOptimizer`, recipes and the planner.

    Field names carry the ``qsr_`` prefix so that a recipe YAML can hold them next to `TrainingArguments`.

    Args:
        qsr_rule (`str`, defaults to `"qsr"`):
            Sync rule: ``qsr`` (H = ⌊(α/η)²⌋), ``linear`` (⌊α/η⌋), ``cubic`` (⌊(α/η)³⌋), ``constant`` (H = H_base),
            ``post_local`` (H = 1 until ``qsr_switch_step``, then H_base) or ``ddp`` (H = 1: average every step).
        qsr_alpha (`float`, *optional*):
            α in H = max(H_base, ⌊(α/η)^γ⌋), in learning-rate units. Required by qsr/linear/cubic.
        qsr_h_base (`int`, defaults to 4):
            H_base: the smallest round length, in optimizer steps (not micro-batches). Paper: 4 for ViT-B.
        qsr_h_max (`int`, *optional*):
            Cap on the round length in optimizer steps. `None`: no cap (the last round is clipped to the end).
        qsr_switch_step (`int`, *optional*):
            Optimizer step at which ``post_local`` switches from H = 1 to H = H_base.
        qsr_average_buffers (`bool`, defaults to `True`):
            Also average floating-point buffers (BatchNorm running statistics) at each sync. The official code keeps
            them local and re-estimates them before evaluation; averaging them is our documented deviation.
        qsr_bn_reestimate_batches (`int`, defaults to 0):
            The official code's BatchNorm handling (use with ``qsr_average_buffers=False``): before each evaluation
            and at the end of training, every rank recomputes the running statistics on this many training batches
            with the averaged parameters, and they are averaged across ranks (official code: 128). 0: off.
        qsr_average_optimizer_state (`bool`, defaults to `False`):
            Also average the optimizer's floating-point state (momentum, Adam moments) at each sync. The paper and
            its official code keep it local (the default); averaging it sends 2-3x the bytes per sync.
        qsr_fp32_average (`bool`, defaults to `True`):
            Average bf16/fp16 tensors in fp32 (the paper averages in fp32).
        qsr_sync_before_eval (`bool`, defaults to `True`):
            Evaluate the averaged model (Trainer); `False` evaluates each rank's own model (per-worker evaluation).
        qsr_eval_copy (`bool`, defaults to `True`):
            Evaluate and save an averaged copy of the model mid-round and then put every rank's local parameters
            back, so evaluations and checkpoints leave the training trajectory unchanged (the official code evaluates
            at syncs only). `False`: an extra sync before each evaluation and save (v0.1 behaviour: the round's
            local progress is averaged away early, which changes training).
        qsr_overlap_sync (`bool`, defaults to `False`):
            Overlap each scheduled sync with the next optimizer step: the all-reduce starts at the end of the round
            and is folded in one step later (parameters = the average + that step's local change). Not the exact QSR
            update (not in the official code); syncs before evaluation/save and the last sync of training stay exact.
        qsr_overlap_steps (`int`, defaults to 1):
            With ``qsr_overlap_sync``: how many optimizer steps an average may take to arrive before it is folded in
            (params = the average + the local change of those steps). A round that ends sooner folds it first.
        qsr_overlap_auto (`bool`, defaults to `False`):
            With ``qsr_overlap_sync``: choose ``qsr_overlap_steps`` from the first overlapped sync's measured transfer
            and step times (the steps the slowest rank's average took), the same on every rank, then keep it.
        qsr_compress_delta (`bool`, defaults to `False`):
            Average the round's change (since the last average: an fp32 anchor, equal on every rank), sent in
            ``qsr_compress_format`` with an fp32 mean (bf16 2, int8 1.016 instead of 4 B/param). Not in the paper; DDP
            only; works in flight (``qsr_overlap_sync``) and per fragment (`qsr_hf.sync.compressed`).
        qsr_compress_format (`str`, defaults to `"bf16"`):
            ``bf16``, ``int8`` (an fp32 scale absmax/127 per 256 values) or ``fp8`` (e4m3fn, absmax/448): `wire_codec`.
        qsr_compress_error_feedback (`bool`, defaults to `False`):
            Each rank adds what encoding its change lost to its next change; saved in each rank's state file.
        qsr_fragments (`int`, defaults to 1):
            F: average the model in F parts of about equal size, part f after step ⌈(f+1)H/F⌉ of each round
            (Streaming DiLoCo's: F bursts per round; with ``qsr_overlap_sync`` each in flight). DDP only.
        qsr_worker (`str`, defaults to `"process"`):
            What one QSR worker is: ``process`` (the paper: every process takes its own local steps) or ``node``
            (hierarchical: the processes of a node all-reduce gradients every step, nodes average every H steps).
        qsr_node_size (`int`, *optional*):
            Processes per node for ``qsr_worker="node"``; defaults to the launcher's ``LOCAL_WORLD_SIZE``.
        qsr_outer_optimizer (`str`, defaults to `"none"`):
            What a sync does with the ranks' average (DiLoCo / SlowMo; not in the QSR paper): ``none`` takes it (the
            paper), ``sgd`` (heavy-ball momentum) or ``nesterov`` steps the last synced parameters with the averaged
            round change (last synced - local, the pseudo-gradient). Buffers are averaged plainly. See `qsr_hf.sync.outer`.
        qsr_outer_lr (`float`, defaults to 0.7):
            Outer learning rate (DiLoCo: 0.7). ``sgd`` with lr 1 and momentum 0 is the plain average, bit for bit.
        qsr_outer_momentum (`float`, defaults to 0.9):
            Outer momentum in [0, 1) (DiLoCo: 0.9).
        qsr_outer_scaling (`str`, defaults to `"none"`):
            ``round_lr``: the outer step per unit of the round's inner-lr work S_r (SlowMo; docs/outer-optimizer.md).
        qsr_outer_momentum_warmup (`int`, defaults to 0):
            W in optimizer steps: a sync after step t uses the outer momentum μ min(1, t/W); 0: μ from the start.
        qsr_outer_state_on_cpu (`bool`, defaults to `False`):
            Keep the outer state (last synced parameters, momentum: 8 B/param) in host memory, streamed at a sync.
        qsr_on_nonfinite (`str`, defaults to `"error"`):
            What a sync does when a rank's tensors hold NaN/inf: ``error`` (every rank raises, naming the rank and
            the step) or ``skip_rank`` (average the finite ranks only, give the result to every rank, warn, and count
            ``qsr/nonfinite_syncs``).
        qsr_elastic_resume (`bool`, defaults to `False`):
            Resume a checkpoint written by another number of processes (N -> M) instead of refusing it: every rank
            starts from the mean of the N saved local models, with the mean of the N saved optimizer states (step
            counters must agree), and a new round starts at the checkpoint's step; every rank logs what was reset.
            DDP (and single-process) runs only. Not part of the config fingerprint: toggling it keeps checkpoints
            readable.
    """

    qsr_rule: Rule = field(default="qsr", metadata={"help": "Sync rule."})
    qsr_alpha: float | None = field(
        default=None,
        metadata={"help": "α in H = max(H_base, ⌊(α/η)^γ⌋), in learning-rate units (qsr/linear/cubic)."},
    )
    qsr_h_base: int = field(
        default=4,
        metadata={"help": "H_base: smallest round length, in optimizer steps (not micro-batches)."},
    )
    qsr_h_max: int | None = field(
        default=None,
        metadata={"help": "Largest round length in optimizer steps; unset for no cap."},
    )
    qsr_switch_step: int | None = field(
        default=None,
        metadata={"help": "post_local: optimizer step at which H goes from 1 to H_base."},
    )
    qsr_average_buffers: bool = field(
        default=True,
        metadata={
            "help": "Average floating-point buffers (BatchNorm statistics) at each sync (deviation: see README)."
        },
    )
    qsr_bn_reestimate_batches: int = field(
        default=0,
        metadata={"help": "Re-estimate BatchNorm statistics on this many training batches before eval (0: off)."},
    )
    qsr_average_optimizer_state: bool = field(
        default=False,
        metadata={"help": "Average the optimizer state (momentum, Adam moments) too; the paper keeps it local."},
    )
    qsr_fp32_average: bool = field(
        default=True,
        metadata={"help": "Average bf16/fp16 parameters in fp32."},
    )
    qsr_sync_before_eval: bool = field(
        default=True,
        metadata={"help": "Average the model before each evaluation (Trainer); false gives per-worker evaluation."},
    )
    qsr_eval_copy: bool = field(
        default=True,
        metadata={
            "help": "Evaluate/save an averaged copy and restore each rank's local parameters after (training "
            "unchanged); false: an extra sync before each evaluation and save (changes the trajectory)."
        },
    )
    qsr_overlap_sync: bool = field(
        default=False,
        metadata={
            "help": "Overlap each scheduled sync with the next step (one-step-delayed average: params = average + "
            "that step's local change). Not the exact QSR update; off by default."
        },
    )
    qsr_overlap_steps: int = field(
        default=1, metadata={"help": "qsr_overlap_sync: optimizer steps an average may take to arrive (>= 1)."}
    )
    qsr_overlap_auto: bool = field(
        default=False,
        metadata={"help": "qsr_overlap_sync: choose qsr_overlap_steps from the first sync's transfer/step times."},
    )
    qsr_compress_delta: bool = field(
        default=False,
        metadata={"help": "Average the round's change in qsr_compress_format; not in the paper; DDP only."},
    )
    qsr_compress_format: CompressFormat = field(default="bf16", metadata={"help": "Wire format: bf16, int8, fp8."})
    qsr_compress_error_feedback: bool = field(default=False, metadata={"help": "Keep and resend encoding residuals."})
    qsr_fragments: int = field(default=1, metadata={"help": "F: average the model in F parts at staggered steps."})
    qsr_worker: Worker = field(
        default="process",
        metadata={"help": "QSR worker: 'process' (paper) or 'node' (gradients all-reduced inside a node)."},
    )
    qsr_node_size: int | None = field(
        default=None,
        metadata={"help": "Processes per node for qsr_worker='node'; defaults to LOCAL_WORLD_SIZE."},
    )
    qsr_outer_optimizer: OuterOptimizer = field(
        default="none",
        metadata={"help": "Outer optimizer on the averaged round change: none (the paper), sgd or nesterov (DiLoCo)."},
    )
    qsr_outer_lr: float = field(default=0.7, metadata={"help": "Outer learning rate (DiLoCo: 0.7)."})
    qsr_outer_momentum: float = field(default=0.9, metadata={"help": "Outer momentum in [0, 1) (DiLoCo: 0.9)."})
    qsr_outer_scaling: OuterScaling = field(
        default="none", metadata={"help": "Outer step per unit of the round's inner-lr work: none or round_lr."}
    )
    qsr_outer_momentum_warmup: int = field(
        default=0, metadata={"help": "Optimizer steps over which the outer momentum ramps up from 0 (0: none)."}
    )
    qsr_outer_state_on_cpu: bool = field(default=False, metadata={"help": "Outer state (8 B/param) in host memory."})

    qsr_on_nonfinite: OnNonfinite = field(
        default="error", metadata={"help": "NaN/inf on a rank at a sync: error (stop every rank) or skip_rank."}
    )
    qsr_elastic_resume: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint of N processes on M != N (mean model and optimizer state)."},
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.qsr_node_size is not None and (not isinstance(self.qsr_node_size, int) or self.qsr_node_size < 1):
            raise ValueError(f"qsr_node_size must be an integer >= 1 (processes per node), got {self.qsr_node_size!r}")
        if not isinstance(self.qsr_h_base, int) or self.qsr_h_base < 1:
            raise ValueError(f"qsr_h_base must be an integer >= 1 (optimizer steps), got {self.qsr_h_base!r}")
        if self.qsr_rule in RULE_EXPONENTS:
            if self.qsr_alpha is None:
                raise ValueError(
                    f"qsr_rule={self.qsr_rule!r} needs qsr_alpha (α in H = max(H_base, ⌊(α/η)^γ⌋)); "
                    "a good start is just above peak_lr * sqrt(qsr_h_base), or pick one with `qsr-hf plan --target-...`"
                )
            if not (self.qsr_alpha > 0 and math.isfinite(self.qsr_alpha)):
                raise ValueError(f"qsr_alpha must be > 0 and finite, got {self.qsr_alpha!r}")
        if self.qsr_h_max is not None and self.qsr_h_max < self.qsr_h_base:
            raise ValueError(
                f"qsr_h_max must be >= qsr_h_base ({self.qsr_h_base}), got {self.qsr_h_max!r}; raise it or unset it"
            )
        check_options(self)
        if self.qsr_rule == "post_local" and (self.qsr_switch_step is None or self.qsr_switch_step < 0):
            raise ValueError(
                f"qsr_rule='post_local' needs qsr_switch_step >= 0 (an optimizer step), got {self.qsr_switch_step!r}"
            )

    def build_schedule(self, warmup_steps: int = 0) -> SyncSchedule:
        """Build the schedule object for this configuration.

        Args:
            warmup_steps (`int`, defaults to 0):
                Optimizer steps of learning-rate warm-up; power rules use H_base during them.

        Returns:
            [`SyncSchedule`]: the schedule.
        """
        if self.qsr_rule in RULE_EXPONENTS:
            return PowerSchedule(
                self.qsr_alpha, RULE_EXPONENTS[self.qsr_rule], self.qsr_h_base, self.qsr_h_max, warmup_steps
            )
        if self.qsr_rule == "constant":
            return ConstantSchedule(self.qsr_h_base)
        if self.qsr_rule == "post_local":
            return PostLocalSchedule(self.qsr_switch_step, self.qsr_h_base)
        return ConstantSchedule(1)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (for logs and the model card)."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> int:
        """A 62-bit digest of every field but ``RESUME_POLICY``'s, equal across processes (unlike ``hash()``, which
        is salted per process).

        Returns:
            `int`: the digest; ranks compare it to catch a run started with different QSR settings per rank.
        """
        items = self.to_dict().items()
        fields = {k: v for k, v in items if k not in RESUME_POLICY and (k, v) not in OMITTED_AT_DEFAULT}
        canonical = json.dumps(fields, sort_keys=True)
        return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big") >> 2


def make_config(config: QSRConfig | None = None, **kwargs: Any) -> QSRConfig:
    """Build a `QSRConfig` from an optional config and keyword overrides.

    Keywords may be given with or without the ``qsr_`` prefix, so ``make_config(alpha=0.02, h_base=4)`` equals
    ``QSRConfig(qsr_alpha=0.02, qsr_h_base=4)``. This is what makes ``QSRCallback(alpha=..., h_base=4)`` work.

    Args:
        config ([`QSRConfig`], *optional*): base configuration; defaults are `QSRConfig`'s own.
        **kwargs: field overrides.

    Returns:
        [`QSRConfig`]: a validated configuration.
    """
    names = {f.name for f in dataclasses.fields(QSRConfig)}
    overrides = {}
    for key, value in kwargs.items():
        name = key if key.startswith("qsr_") else f"qsr_{key}"
        if name not in names:
            raise TypeError(f"unknown QSR option {key!r}; valid options: {sorted(names)}")
        overrides[name] = value
    if config is None:
        return QSRConfig(**overrides)
    return dataclasses.replace(config, **overrides)
