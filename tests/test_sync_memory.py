"""The memory a rank's syncs hold (`qsr_hf.core.memory.sync_memory`, printed by ``qsr-hf plan``) is what the real
averagers allocate: measured on 2 gloo ranks as the bytes of every tensor reachable from the sync's parts (and from
an average in flight), the model's own parameters left out."""

import torch
import torch.distributed as dist
from testing_utils import run_distributed

from qsr_hf.core.config import QSRConfig
from qsr_hf.core.memory import CHUNK, sync_memory


# a model above CHUNK (the outer step's work buffers are then at their cap) whose size is whole int8 blocks on 2 ranks
SHAPES = [(2048, 2048), (256, 2048)]
NUMEL = sum(a * b for a, b in SHAPES)
CONFIGS = [
    {},
    {"qsr_outer_optimizer": "nesterov"},
    {"qsr_outer_optimizer": "sgd", "qsr_outer_momentum": 0.0},
    {"qsr_compress_delta": True},
    {"qsr_compress_delta": True, "qsr_compress_format": "int8", "qsr_compress_error_feedback": True},
    {"qsr_overlap_sync": True},
    {"qsr_overlap_sync": True, "qsr_outer_optimizer": "nesterov"},
    {"qsr_overlap_sync": True, "qsr_compress_delta": True, "qsr_compress_format": "int8"},
]
SKIPPED = (torch.nn.Module, torch.optim.Optimizer, type, str, bytes, int, float)


def held_bytes(roots: list, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots`` through attributes and containers, except
    those whose data pointer is in ``exclude`` (modules and optimizers are not entered)."""
    seen, storages, stack = set(), {}, list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, SKIPPED):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "func") and hasattr(obj, "keywords"):  # functools.partial
            stack.extend([*obj.args, *obj.keywords.values()])
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))
    return sum(storages.values())


def _measure(rank, world_size, configs):
    from qsr_hf.engines.base import Engine
    from qsr_hf.runtime.parts import build_parts

    out = []
    for fields in configs:
        model = torch.nn.Sequential(*(torch.nn.Linear(b, a, bias=False) for a, b in SHAPES))
        config = QSRConfig(qsr_rule="constant", qsr_h_base=4, **fields)
        engine = Engine(model)
        engine.process_group = dist.group.WORLD
        parts = build_parts(
            config,
            engine,
            lambda engine=engine: engine.averaged_tensors(True),
            lambda t, mode, engine=engine, c=config: engine.make_averager(t, c.qsr_fp32_average, mode),
        )
        model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        idle = held_bytes([parts], model_storages)
        if config.qsr_overlap_sync:  # an average in flight, as the overlap starts it
            flight = parts.averager.average(async_op=True, keep_local_change=True)
            peak = held_bytes([parts, flight], model_storages)
            flight.wait()
        else:
            parts.averager.average()
            peak = held_bytes([parts], model_storages)
        out.append((idle, peak))
    return out


def _check(configs: list[dict], measured: list[tuple[int, int]], world_size: int) -> None:
    for fields, (idle, peak) in zip(configs, measured, strict=True):
        memory = sync_memory(QSRConfig(qsr_rule="constant", **fields), world_size=world_size)
        expected = memory.total_bytes(NUMEL)
        # a sync header's few values ride at the end of a bucket's buffer (at most 256 bytes)
        assert 0 <= peak - expected <= 256, (world_size, fields, peak, expected, memory)
        assert 0 <= idle - (expected - memory.in_flight_per_param * NUMEL) <= 256, (world_size, fields, idle, memory)


def test_sync_memory_is_what_the_averagers_hold():
    measured, _ = run_distributed(_measure, configs=CONFIGS)
    assert NUMEL > CHUNK
    _check(CONFIGS, measured, 2)
    # the outer step's two work buffers stop at CHUNK values: 32 MiB, not 8 B per value
    assert sync_memory(QSRConfig(qsr_rule="constant", qsr_outer_optimizer="nesterov")).fixed_bytes == 32 * 2**20


def test_sync_memory_of_a_compressed_average_on_three_ranks():
    # this rank's share of a compressed average is 1/3 of the wire (NUMEL is whole int8 blocks on 3 ranks too)
    configs = [{"qsr_compress_delta": True, "qsr_compress_format": "int8", "qsr_overlap_sync": True}]
    measured, _, _ = run_distributed(_measure, world_size=3, configs=configs)
    _check(configs, measured, 3)


def test_sync_memory_line():
    memory = sync_memory(
        QSRConfig(qsr_rule="constant", qsr_outer_optimizer="nesterov", qsr_overlap_sync=True), world_size=2
    )
    assert memory.per_param == {"anchor": 4, "outer momentum": 4, "copy buffers": 4}
    assert memory.describe() == (
        "12 B (anchor 4, outer momentum 4, copy buffers 4), +4 B while an average is in flight (the values sent), "
        "+ at most 32 MiB of outer-step work buffers"
    )
    on_host = sync_memory(QSRConfig(qsr_rule="constant", qsr_outer_optimizer="nesterov", qsr_outer_state_on_cpu=True))
    assert on_host.host_parts == ("anchor", "outer momentum") and on_host.fixed_bytes == 64 * 2**20
    assert sync_memory(QSRConfig(qsr_rule="constant")).peak_per_param == 0
