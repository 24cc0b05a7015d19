"""Imports point downward: pure modules import no torch.distributed/transformers; nothing imports the front ends."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "qsr_hf"
PURE = ["schedules", "clock", "config", "planner", "accounting", "scaling"]
FRONT_ENDS = {"callback", "train", "cli"}


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", [m for m in PURE if (PACKAGE / f"{m}.py").exists()])
def test_pure_modules_import_no_framework(module):
    heavy = {n for n in imports(module) if n.split(".")[0] in {"torch", "transformers", "accelerate", "deepspeed"}}
    assert not heavy, f"qsr_hf/{module}.py must stay pure, imports {heavy}"


def test_nothing_imports_the_front_ends():
    # cli runs train; train builds the callback; the package re-exports the callback
    allowed = {"cli": {"train"}, "train": {"callback"}, "__init__": {"callback"}}
    for path in PACKAGE.glob("*.py"):
        used = {n.split(".")[1] for n in imports(path.stem) if n.startswith("qsr_hf.") and n.count(".") == 1}
        bad = (used & FRONT_ENDS) - allowed.get(path.stem, set())
        assert not bad, f"qsr_hf/{path.stem}.py imports front end(s) {bad}"
