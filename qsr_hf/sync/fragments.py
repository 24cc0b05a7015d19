"""Fragments (``qsr_fragments``, Streaming DiLoCo's pattern): the averaged tensors split into F parts, each averaged
at its own step of the round, so that the link is busy in F smaller bursts instead of one.

Pure: the partition of the tensors (the same on every rank: it depends on their sizes alone) and the schedule, used
by [`ParameterAverager`] (one bucket per fragment, device and dtype), the [`Synchronizer`] and the simulation.
Fragment ``f`` (0-based) of a round of H steps is averaged after step ``ceil((f + 1) H / F)`` of the round: the last
one at the round's end, together with every fragment whose step is also H (H < F). Averages outside the schedule
(evaluation view, checkpoints, ``sync_now``) and the last sync of training average the whole model.
"""

from collections.abc import Sequence

from qsr_hf.core.clock import SyncClock


def partition(numels: Sequence[int], fragments: int) -> list[int]:
    """The fragment of each tensor: ``fragments`` contiguous runs of the tensors, in order, of about equal numel.

    A tensor goes to the fragment that holds its middle element when the elements are cut into equal parts, moved
    by at most one fragment so that no fragment is empty.

    Args:
        numels (`Sequence[int]`): the tensors' numbers of elements, in averaging order.
        fragments (`int`): F, the number of fragments.

    Returns:
        `list[int]`: a non-decreasing fragment index in ``[0, F)`` per tensor; every fragment gets at least one.

    Raises:
        `ValueError`: if there are fewer tensors than fragments.
    """
    if len(numels) < fragments:
        raise ValueError(
            f"qsr_fragments={fragments} needs at least {fragments} averaged tensors, the model has {len(numels)}: "
            "lower qsr_fragments"
        )
    total, before, out = max(1, sum(numels)), 0, []
    for i, n in enumerate(numels):
        middle = min(fragments - 1, (2 * before + n) * fragments // (2 * total))  # holds the tensor's middle
        previous = out[-1] if out else -1
        out.append(max(fragments - (len(numels) - i), min(middle, previous + 1)))
        before += n
    return out


def offset(fragment: int, round_length: int, fragments: int) -> int:
    """The step of a round of ``round_length`` steps after which ``fragment`` is averaged: ``ceil((f + 1) H / F)``."""
    return -(-(fragment + 1) * round_length // fragments)


def due(steps_into_round: int, round_length: int, fragments: int) -> list[int]:
    """The fragments averaged after step ``steps_into_round`` (1-based) of a round of ``round_length`` steps."""
    return [f for f in range(fragments) if offset(f, round_length, fragments) == steps_into_round]


def in_sync(clock: SyncClock, fragments: int, synced_at: int) -> bool:
    """Whether every rank holds the same averaged tensors now, so that an extra average would change nothing.

    With one fragment: at a round boundary. With several only right after a whole-model average (``synced_at``,
    the step of the last one) or before training: at a round end only the last fragments were averaged.
    """
    boundary = not clock.in_round or clock.steps_into_round == 0
    if fragments == 1:
        return boundary
    return synced_at == clock.step or (boundary and clock.step == 0)


def due_after_step(clock: SyncClock, fragments: int, round_length: int) -> list[int] | None:
    """The fragments to average after the optimizer step ``clock.end_step()`` just counted.

    Args:
        clock ([`SyncClock`]): the round position (after ``end_step``).
        fragments (`int`): F (``qsr_fragments``).
        round_length (`int`): H of the round that step belonged to.

    Returns:
        `list[int]` or `None`: `None` (the whole model) at a round end with one fragment and at the last step of
        training; otherwise the fragments due at this step of the round (``[]`` when none is).
    """
    steps = clock.step - clock.round_start  # of the round, this one included (end_step leaves round_start)
    last = clock.total_steps is not None and clock.step >= clock.total_steps
    if fragments == 1 or last:
        return None if steps == round_length else []
    return due(steps, round_length, fragments)
