"""Layering rules over folders, checked on the import statements (AST):

- the pure core (config, schedules, clock, accounting, fragments) and the planner/scaling model import no torch, transformers,
  accelerate or deepspeed;
- the library (``qsr_hf/*.py``, ``qsr_hf/engines/``) never imports the recipe app (``qsr_hf/training/``); only
  ``cli.py``, the command line, starts it;
- ``qsr_hf/analysis/`` imports neither the recipe app nor the front ends;
- only ``qsr_hf/averaging.py`` and ``qsr_hf/average_handle.py`` (the average's collectives, the sync header riding
  on them), ``qsr_hf/agreement.py`` (the agreement and finiteness checks),
  ``qsr_hf/node_slices.py`` (the node all-gather) and ``qsr_hf/compressed_averaging.py`` (``qsr_compress_delta``: an
  all-to-all and an all-gather of bf16 deltas) call collectives, and only ``qsr_hf/ft/averaging.py`` calls torchft's
  ``Manager.allreduce``;
- ``qsr-hf --help`` and ``import qsr_hf.analysis.planner`` load neither torch nor transformers.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "qsr_hf"
PURE = [
    "schedules.py",
    "clock.py",
    "config.py",
    "config_checks.py",
    "fragments.py",
    "field_checks.py",
    "accounting.py",
    "analysis/planner.py",
    "analysis/scaling.py",
]
HEAVY = {"torch", "transformers", "accelerate", "deepspeed"}
FRONT_ENDS = {"qsr_hf.callback", "qsr_hf.local_optimizer"}
ALLOWED_COLLECTIVES = (
    "averaging.py",
    "average_handle.py",
    "agreement.py",
    "node_slices.py",
    "compressed_averaging.py",
)
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "all_gather_single",
}  # fmt: skip


def modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_framework(module):
    heavy = {n for n in imports(PACKAGE / module) if n.split(".")[0] in HEAVY}
    assert not heavy, f"qsr_hf/{module} must stay pure, imports {heavy}"


def test_library_never_imports_the_recipe_app():
    for path in modules() + modules("engines") + modules("analysis"):
        if path.name == "cli.py":
            continue
        bad = {n for n in imports(path) if n.startswith("qsr_hf.training")}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports the recipe app: {bad}"


def test_analysis_does_not_import_the_front_ends():
    for path in modules("analysis"):
        bad = imports(path) & FRONT_ENDS
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports front end(s) {bad}"


def test_only_averaging_runs_collectives():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ALLOWED_COLLECTIVES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if is_call and node.func.attr in COLLECTIVES and getattr(node.func.value, "id", "") == "dist":
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} dist.{node.func.attr}")
    assert not offenders, offenders


def test_only_ft_averaging_runs_manager_collectives():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).as_posix() != "ft/averaging.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "allreduce"
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "code",
    [
        "import qsr_hf.analysis.planner, qsr_hf.config",
        "import sys; sys.argv = ['qsr-hf', '--help']\nimport qsr_hf.cli\ntry:\n    qsr_hf.cli.main()\nexcept SystemExit: pass",
    ],
)
def test_light_entry_points_load_no_framework(code):
    check = "\nimport sys\nheavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\nprint(heavy)"
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
