"""``qsr_compress_format`` (int8, fp8; bf16 in test_compression.py) and ``qsr_compress_error_feedback``: the codec
against a reference written here, real gloo groups of 2 and 3, bytes on the wire, a mid-round resume with residuals."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from test_compression import STEPS, _model_and_optimizer, _step
from testing_utils import count_collectives, flat_params, rank_batches, run_distributed

from qsr_hf import QSRConfig
from qsr_hf.core.wire import padded_numel, wire_bytes
from qsr_hf.sync.compressed import CompressedAverager
from qsr_hf.sync.wire_codec import WireCodec


BLOCK = 256
SHAPES = [((64, 200), torch.float32), ((300,), torch.float32), ((77,), torch.bfloat16)]  # 13,177 values
N = 64 * 200 + 300 + 77


def reference_round_trip(x, fmt):
    """The documented codec, written out: per block of 256 values, scale = absmax / qmax, round to nearest (int8)
    or cast (fp8), clamp, times the scale; bf16: a plain cast. ``x`` flat fp32, a multiple of 256 long."""
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    qmax = 127.0 if fmt == "int8" else 448.0
    blocks = x.reshape(-1, BLOCK)
    scale = blocks.abs().max(dim=1, keepdim=True).values / qmax
    q = blocks / torch.where(scale == 0, torch.ones_like(scale), scale)
    if fmt == "int8":
        q = torch.clamp(torch.round(q), -127, 127).to(torch.int8)
    else:
        q = torch.clamp(q, -448, 448).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(-1)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "bf16"])
def test_codec_matches_the_reference(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 * BLOCK, generator=g) * torch.logspace(-6, 2, 8).repeat_interleave(BLOCK)  # scales per block
    x[3 * BLOCK : 4 * BLOCK] = 0  # a block of zeros: scale 0, decodes to zeros
    x[5 * BLOCK + 7] = 1e3  # an outlier sets its block's scale
    codec = WireCodec(fmt)
    wire = codec.buffer(2, 4 * BLOCK, x.device)
    codec.encode(x.view(2, -1), wire)
    decoded = codec.decode(wire, 4 * BLOCK).reshape(-1)
    assert torch.equal(decoded, reference_round_trip(x, fmt))
    assert torch.equal(
        codec.round_trip(x[:1000]), reference_round_trip(torch.cat([x[:1000], x.new_zeros(24)]), fmt)[:1000]
    )
    assert (decoded[3 * BLOCK : 4 * BLOCK] == 0).all()
    if fmt == "int8":  # within half a step of its block
        step = x.view(-1, BLOCK).abs().amax(1, keepdim=True) / 127
        assert ((decoded - x).view(-1, BLOCK).abs() <= step / 2 * (1 + 1e-6)).all()


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for shape, dtype in SHAPES]


def _syncs(rank, world_size, fmt, feedback):
    tensors = _tensors()
    averager = CompressedAverager(tensors, fmt=fmt, error_feedback=feedback)
    g = torch.Generator().manual_seed(100 + rank)
    out = {"rounds": [], "collective_bytes": averager.collective_bytes, "recorded": []}
    for _ in range(2):
        anchor = averager.anchor.clone()
        residual = None if averager.residual is None else averager.residual.clone()
        with torch.no_grad():
            for i, t in enumerate(tensors):  # a round of change, different on every rank and tensor
                t.add_((0.01 * (1 + rank) * 10.0**-i * torch.randn(t.shape, generator=g)).to(t.dtype))
        before = [t.clone() for t in tensors]
        plain = []

        def transform(
            index, flat, plain=plain
        ):  # the plain average the outer step would be given: anchor + decoded mean
            plain.append(flat.clone())
            averager.synced.advance(index, flat)

        log = []
        with count_collectives(log):
            out["recorded"].append(averager.average(transform=transform))
        out["rounds"].append(
            {
                "anchor": anchor,
                "residual": residual,
                "before": before,
                "plain": torch.cat(plain),
                "after": [t.clone() for t in tensors],
                "new_anchor": averager.anchor.clone(),
                "new_residual": None if averager.residual is None else averager.residual.clone(),
                "collectives": [name for name, _ in log],
            }
        )
    return out


def _flat(tensors, size):
    out = torch.zeros(size, dtype=torch.float32)
    out[:N] = torch.cat([t.float().reshape(-1) for t in tensors])
    return out


@pytest.mark.parametrize(
    ("world_size", "fmt", "feedback"),
    # fp8's codec is checked bitwise in the default run; its 3-rank sync with -m slow (time budget)
    [(2, "int8", True), (3, "int8", True), pytest.param(3, "fp8", False, marks=pytest.mark.slow), (3, "bf16", True)],
)
def test_syncs_are_the_reference_mean_of_dequantized_deltas(world_size, fmt, feedback):
    results = run_distributed(_syncs, world_size=world_size, fmt=fmt, feedback=feedback)
    size = padded_numel(N, world_size, fmt)
    assert size % (world_size * BLOCK) == 0 or fmt == "bf16"
    residuals = [torch.zeros(size) for _ in results]
    for i in range(2):
        rounds = [r["rounds"][i] for r in results]
        anchor = rounds[0]["anchor"]
        dequantized = []
        for k, rd in enumerate(rounds):
            assert torch.equal(rd["anchor"], anchor), f"round {i}: rank {k}'s anchor differs"
            assert rd["collectives"] == ["all_to_all_single", "all_gather_single"], rd["collectives"]
            x = _flat(rd["before"], size) - anchor
            if feedback:
                assert torch.equal(rd["residual"], residuals[k]), f"round {i}: rank {k}'s residual was not carried"
                x = x + residuals[k]
            dequantized.append(reference_round_trip(x, fmt))
            residuals[k] = x - dequantized[-1]
            if feedback:
                assert torch.equal(rd["new_residual"], residuals[k]), f"round {i}: rank {k}'s new residual"
                assert residuals[k].abs().max() > 0 and (residuals[k][N:] == 0).all()
            for t, t0 in zip(rd["after"], rounds[0]["after"], strict=True):
                assert torch.equal(t, t0), f"round {i}: rank {k} differs from rank 0 after the sync"
        total = dequantized[0].clone()
        for d in dequantized[1:]:
            total += d  # fp32, rank order
        expected = anchor + reference_round_trip(total / world_size, fmt)
        assert torch.equal(rounds[0]["new_anchor"], expected), f"round {i}: not the reference mean"
        assert torch.equal(rounds[0]["plain"], expected[:N]), "the outer step is given anchor + the decoded mean"
        for t, view in zip(rounds[0]["after"], torch.split(expected[:N], [12800, 300, 77]), strict=True):
            assert torch.equal(t.reshape(-1), view.to(t.dtype))
    # bytes: the actual buffers (all-to-all input + all-gather output) against fp32's all-reduce buffer (4 N, twice)
    for r in results:
        assert r["collective_bytes"] == 2 * wire_bytes(N, world_size, fmt) == 2 * r["recorded"][0]
        ratio = r["collective_bytes"] / (2 * 4 * N)
        assert ratio <= (0.27 if fmt != "bf16" else 0.5 + 1e-3), ratio


STEPS_H, CUT, VIEW = 3, 5, 4  # syncs after steps 3, 6, 9, 10; save at 5 and an eval copy at 4 (mid-round)


def _training(rank, world_size, tmp, config):
    accelerator = Accelerator()
    batches = rank_batches(rank, STEPS)
    out = {"full": [], "resumed": [], "residuals": []}
    model, local = _model_and_optimizer(0, config, accelerator)
    averager = local.synchronizer.averager
    for i, batch in enumerate(batches, 1):
        _step(model, local, batch)
        out["full"].append(flat_params(model.module))
        out["residuals"].append(averager.residual.clone())
        if i == VIEW:  # an evaluation's average does not commit: the residual stays
            local.synchronizer.enter_averaged_view()
            local.synchronizer.leave_averaged_view()
            out["view_kept_residual"] = torch.equal(averager.residual, out["residuals"][-1])
    model, local = _model_and_optimizer(0, config, accelerator)
    for batch in batches[:CUT]:
        _step(model, local, batch)
    local.save_local_state(tmp)
    model, local = _model_and_optimizer(123, config, accelerator)
    local.load_local_state(tmp)
    out["loaded_residual"] = local.synchronizer.averager.residual.clone()
    for batch in batches[CUT:]:
        _step(model, local, batch)
        out["resumed"].append(flat_params(model.module))
    return out


def test_int8_with_feedback_and_outer_step_resumes_bitwise(tmp_path):
    config = QSRConfig(
        qsr_rule="constant", qsr_h_base=STEPS_H, qsr_compress_delta=True, qsr_compress_format="int8",
        qsr_compress_error_feedback=True, qsr_outer_optimizer="nesterov",
    )  # fmt: skip
    r0, r1 = run_distributed(_training, tmp=str(tmp_path), config=config)
    for r in (r0, r1):
        assert r["view_kept_residual"]
        assert torch.equal(r["loaded_residual"], r["residuals"][CUT - 1]), "the residual comes back from the file"
        assert r["residuals"][STEPS_H - 1].abs().max() > 0, "a sync leaves a residual"
        for step, (full, resumed) in enumerate(zip(r["full"][CUT:], r["resumed"], strict=True), CUT + 1):
            assert torch.equal(full, resumed), f"step {step}: the resumed run differs from the uninterrupted one"
    for step in (STEPS_H, 2 * STEPS_H, 3 * STEPS_H, STEPS):
        assert torch.equal(r0["full"][step - 1], r1["full"][step - 1]), f"step {step}: ranks differ after a sync"
    assert not torch.equal(r0["residuals"][STEPS_H - 1], r1["residuals"][STEPS_H - 1]), "residuals are per rank"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qsr_compress_format": "int8"}, "qsr_compress_format='int8' .*set qsr_compress_delta=True, or"),
        ({"qsr_compress_error_feedback": True}, "qsr_compress_error_feedback=True .*set qsr_compress_delta=True"),
        ({"qsr_compress_format": "int4", "qsr_compress_delta": True}, "qsr_compress_format"),
        (
            {"qsr_compress_format": "int8", "qsr_compress_delta": True, "qsr_average_optimizer_state": True},
            "qsr_average_optimizer_state=True .*set qsr_average_optimizer_state=False",
        ),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSRConfig(qsr_rule="constant", **kwargs)


def test_fingerprint_unchanged_at_the_defaults():
    base = QSRConfig(qsr_rule="constant", qsr_compress_delta=True)
    assert base.fingerprint() == dataclasses.replace(base, qsr_compress_format="bf16").fingerprint()
    assert base.fingerprint() != dataclasses.replace(base, qsr_compress_format="int8").fingerprint()
    assert base.fingerprint() != dataclasses.replace(base, qsr_compress_error_feedback=True).fingerprint()
