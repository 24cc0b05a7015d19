"""The library's layers and ownership rules, checked on the source (AST) and by import-linter's contract:

- imports point down the layers of ``[tool.importlinter]`` in pyproject.toml (cli -> training | ft -> frontends ->
  checkpoint -> runtime -> engines -> analysis -> sync -> core), ``TYPE_CHECKING`` imports included, and the modules
  of a subpackage import each other without circles: ``lint-imports`` keeps both contracts, and breaks them when an
  upward import or a circle is planted in a copy of the package;
- the pure core (``core/``: config, schedules, clock, accounting, ...) and the planner/scaling model import no torch,
  transformers, accelerate or deepspeed; ``qsr-hf --help`` and ``import qsr_hf.analysis.planner`` load neither;
- one owner per piece of state: no module assigns an attribute of another object or reads another's private
  attribute, except the framework objects an adapter exists to drive (listed in ``FRAMEWORK_WRITES``);
- no library module is over 300 lines;
- only the averaging modules call collectives, and only ``qsr_hf/ft/averaging.py`` calls torchft's ``allreduce``.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "qsr_hf"
PURE = [
    "core/schedules.py",
    "core/clock.py",
    "core/config.py",
    "core/config_checks.py",
    "core/field_checks.py",
    "core/accounting.py",
    "core/wire.py",
    "sync/fragments.py",
    "analysis/planner.py",
    "analysis/scaling.py",
]
HEAVY = {"torch", "transformers", "accelerate", "deepspeed"}
ALLOWED_COLLECTIVES = (
    "sync/averaging.py",
    "sync/handle.py",
    "sync/agreement.py",
    "sync/node_slices.py",
    "sync/wire_segments.py",  # the compressed average's all-to-all and all-gather
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
        "import qsr_hf.analysis.planner, qsr_hf.core.config",
        "import sys; sys.argv = ['qsr-hf', '--help']\nimport qsr_hf.cli\ntry:\n    qsr_hf.cli.main()\nexcept SystemExit: pass",
    ],
)
def test_light_entry_points_load_no_framework(code):
    check = "\nimport sys\nheavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\nprint(heavy)"
    out = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    config = root / "pyproject.toml"
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--config", str(config), "--no-cache"],
        check=False,
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
    )


def test_import_contracts_hold():
    result = lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


PLANTED = "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from {target} import {name}  # noqa\n"


@pytest.mark.parametrize(
    ("module", "target", "name", "broken"),
    [
        ("sync/handle.py", "qsr_hf.runtime.synchronizer", "Synchronizer", "qsr_hf.sync.handle -> qsr_hf.runtime"),
        ("core/config_checks.py", "qsr_hf.core.config", "QSRConfig", ".config_checks -> .config"),
        ("runtime/checks.py", "qsr_hf.runtime.synchronizer", "Synchronizer", ".checks -> .synchronizer"),
    ],
    ids=["upward", "circle-in-core", "circle-in-runtime"],
)
def test_planted_import_breaks_the_contract(tmp_path, module, target, name, broken):
    shutil.copytree(PACKAGE, tmp_path / "qsr_hf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "qsr_hf" / module, "a") as f:
        f.write(PLANTED.format(target=target, name=name))
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout
    assert broken in result.stdout, result.stdout


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "training" not in p.relative_to(PACKAGE).parts)


def test_no_module_over_300_lines():
    long = {
        p.relative_to(PACKAGE).as_posix(): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 300
    }
    assert not long, long


# writes onto framework objects that an adapter exists to drive (DDP, DeepSpeed, the Trainer, torch tensors and
# modules), and reads of framework internals with no public API; every qsr_hf object writes only its own fields
FRAMEWORK_WRITES = {
    ("analysis/data_parallel.py", "p.grad"),
    ("engines/ddp.py", "self.ddp.require_forward_param_sync"),
    ("engines/deepspeed.py", "engine.enable_backward_allreduce"),
    ("engines/deepspeed.py", "engine.clip_fp32_gradients"),
    ("engines/deepspeed.py", "self.engine.skipped_steps"),
    ("engines/deepspeed.py", "checker.deepspeed"),
    ("engines/fsdp2.py", "state._fsdp_param_groups"),
    ("engines/fsdp2.py", "module._get_fsdp_state"),
    ("engines/fsdp2.py", "state._auto_reshard_after_forward"),
    ("engines/hierarchical.py", "self.ddp.broadcast_buffers"),
    ("frontends/callback.py", "args.average_tokens_across_devices"),
    ("frontends/callback.py", "trainer.callback_handler.callbacks"),
    ("frontends/callback.py", "sys._getframe"),
    ("frontends/callback.py", "trainer._prepare_inputs"),
    ("sync/batchnorm.py", "nn.modules.batchnorm._BatchNorm"),
    ("sync/batchnorm.py", "layer.momentum"),
    ("sync/flat_buckets.py", "t.data"),
}


def foreign_accesses(path: Path) -> set[tuple[str, str]]:
    """(module, expression) of every attribute assigned on, or private attribute read from, an object other than
    ``self``/``cls``."""
    found = set()
    where = path.relative_to(PACKAGE).as_posix()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets = [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else targets
        for sub in (s for t in targets for s in ast.walk(t)):
            if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and not _own(sub.value):
                found.add((where, ast.unparse(sub)))
        private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        if private and not _own(node.value):
            found.add((where, ast.unparse(node)))
    return found


def _own(value: ast.expr) -> bool:
    return isinstance(value, ast.Name) and value.id in ("self", "cls")


def test_no_module_writes_another_objects_state():
    found = set().union(*(foreign_accesses(p) for p in library_modules()))
    assert not found - FRAMEWORK_WRITES, sorted(found - FRAMEWORK_WRITES)
    assert not FRAMEWORK_WRITES - found, f"stale entries: {sorted(FRAMEWORK_WRITES - found)}"


def test_ownership_check_catches_a_planted_write(tmp_path):
    planted = tmp_path / "qsr_hf" / "runtime" / "view.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def leave(sync):\n    sync.synced_at = -1\n    return sync.averager._in_flight\n")
    found = {expr for _, expr in foreign_accesses_at(planted, tmp_path / "qsr_hf")}
    assert found == {"sync.synced_at", "sync.averager._in_flight"}


def foreign_accesses_at(path: Path, package: Path) -> set[tuple[str, str]]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        return foreign_accesses(path)
    finally:
        PACKAGE = saved
