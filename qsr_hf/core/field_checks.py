"""`check_field_types`: refuse a dataclass field whose value has the wrong type, naming the field (pure)."""

import dataclasses
import types
import typing
from typing import Any, Literal


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    # `float | None` -> (float, int, NoneType): an int is a valid float, a bool is neither; Literal[...] -> its types
    if typing.get_origin(annotation) is Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    allowed = tuple(type(None) if a is None else a for a in args)
    return allowed + ((int,) if float in allowed else ())


def check_field_types(config: Any) -> None:
    """Refuse a field whose value has the wrong type (e.g. ``qsr_alpha: [0.02]`` or ``qsr_h_base: true`` in YAML).

    Args:
        config: a dataclass instance whose annotations are plain types or unions of them.

    Raises:
        `ValueError`: naming the field, the expected type and the value.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, allowed = getattr(config, f.name), _allowed_types(hints[f.name])
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            names = " or ".join(
                "None" if a is type(None) else a.__name__ for a in allowed if a is not int or float not in allowed
            )
            raise ValueError(f"{f.name} must be {names}, got {value!r} ({type(value).__name__})")
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {list(choices)}, got {value!r}")
