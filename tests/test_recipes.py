"""Every recipe parses into the four dataclasses and validates; overrides win; unknown keys fail; configs load."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from transformers import get_scheduler

from qsr_hf.analysis.planner import plan
from qsr_hf.core.config import QSRConfig
from qsr_hf.training.arguments import check_output_dir, recipe_path
from qsr_hf.training.train import (
    DataArguments,
    ModelArguments,
    make_callbacks,
    make_parser,
    parse_recipe,
    reproduce_command,
)


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))
IMAGENET = [p for p in RECIPES if "imagenet1k" in p.parent.name]
METHODS = ["parallel", "constant", "post_local", "linear", "cubic", "qsr"]
LM_METHODS = ["parallel", "diloco", "qsr", "qsr_nesterov"]
LLAMA = [p for p in RECIPES if p.parent.name == "llama150m_c4"]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_recipe_tree_is_complete():
    for family in ("vit_b16_imagenet1k", "resnet152_imagenet1k"):
        assert sorted(p.stem for p in (ROOT / "recipes" / family).glob("*.yaml")) == sorted(METHODS), family
    assert sorted(p.stem for p in (ROOT / "recipes" / "llama150m_c4").glob("*.yaml")) == sorted(LM_METHODS)
    assert {p.stem for p in (ROOT / "recipes" / "demo").glob("*.yaml")} == {"qsr", "parallel", "lm_qsr", "lm_parallel"}


@pytest.mark.parametrize("recipe", RECIPES, ids=rel)
def test_recipe_parses_and_validates(recipe):
    model_args, data_args, qsr_config, args = parse_recipe(recipe, ["--output_dir", "unused"])
    assert isinstance(model_args, ModelArguments) and isinstance(data_args, DataArguments)
    assert isinstance(qsr_config, QSRConfig)  # __post_init__ checks ran
    assert args.max_steps > 0, "the planner needs max_steps"
    assert 0 <= args.get_warmup_steps(args.max_steps) < args.max_steps
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr"
    min_lr = args.lr_scheduler_kwargs["min_lr"]
    assert isinstance(min_lr, float) and 0 < min_lr < args.learning_rate  # "1e-6" in YAML would be a string
    qsr_config.build_schedule(args.get_warmup_steps(args.max_steps))
    assert (qsr_config.qsr_rule == "ddp") == recipe.stem.endswith("parallel")


@pytest.mark.parametrize("recipe", RECIPES, ids=rel)
def test_every_number_has_a_source_comment(recipe):
    text = recipe.read_text()
    values = yaml.safe_load(text)
    for line in text.splitlines():
        match = re.match(r"^(\w+):(.*)$", line)
        if not match:
            continue
        value = values[match.group(1)]
        numeric = isinstance(value, (int, float, dict, list)) and not isinstance(value, bool)
        if numeric:
            assert "#" in match.group(2), (
                f"{rel(recipe)}: `{line}` needs a comment: paper / official code / assumption"
            )


@pytest.mark.parametrize("recipe", IMAGENET, ids=rel)
def test_imagenet_recipes_follow_the_paper(recipe):
    _, data_args, qsr_config, args = parse_recipe(recipe, [])
    vit = recipe.parent.name.startswith("vit")
    assert args.max_steps == (93_600 if vit else 62_400)
    assert args.learning_rate == (0.008 if vit else 0.8)
    assert args.get_warmup_steps(args.max_steps) == (10_000 if vit else 1_560)
    assert args.fp16 and data_args.dataset_name == "ILSVRC/imagenet-1k" and data_args.image_size == 224
    assert data_args.mixup_alpha == (0.2 if vit else 0.0) and data_args.label_smoothing == (0.0 if vit else 0.1)
    local = recipe.stem != "parallel"
    if vit:
        assert args.weight_decay == (0.05 if local else 0.1) and args.max_grad_norm == (0.0 if local else 1.0)
    if local:
        assert qsr_config.qsr_h_base == 4
    if recipe.stem == "qsr" and vit:
        assert qsr_config.qsr_alpha == 0.0175
    if recipe.stem == "parallel":
        assert make_callbacks(qsr_config) == [], "the data-parallel baseline is plain DDP, without the callback"
    # the official code's model, augmentation and micro-batches (ViT: 128, mixup per micro-batch; ResNet: 32, BN)
    model_args = parse_recipe(recipe, [])[0]
    assert model_args.model_type == ("simple_vit_b16" if vit else "resnet152")
    assert (data_args.randaugment_depth, data_args.randaugment_severity) == ((2, 10) if vit else (0, 10))
    assert args.per_device_train_batch_size == (128 if vit else 32)
    assert 16 * args.per_device_train_batch_size * args.gradient_accumulation_steps == 4096


@pytest.mark.parametrize("recipe", LLAMA, ids=rel)
def test_llama_recipes_follow_diloco(recipe):
    model_args, data_args, qsr_config, args = parse_recipe(recipe, [])
    assert (model_args.task, model_args.model_type, model_args.tokenizer_name) == (
        "causal-lm",
        "llama_150m",
        "google-t5/t5-base",
    )
    assert (data_args.dataset_name, data_args.dataset_config, data_args.streaming) == ("allenai/c4", "en", True)
    assert data_args.block_size == 1024 and args.learning_rate == 4e-4 and args.max_steps == 88_000
    assert 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps == 512
    outer = (qsr_config.qsr_outer_optimizer, qsr_config.qsr_outer_lr, qsr_config.qsr_outer_momentum)
    if recipe.stem == "diloco":
        assert outer == ("nesterov", 0.7, 0.9)  # DiLoCo's outer step, as published
    elif recipe.stem == "qsr_nesterov":
        assert outer == ("nesterov", 0.7, 0.5)  # the setting benchmarks/lm_study.py picked for QSR
    else:
        assert outer[0] == "none"
    if recipe.stem == "diloco":
        assert (qsr_config.qsr_rule, qsr_config.qsr_h_base) == ("constant", 500)
    if recipe.stem.startswith("qsr"):
        # at DiLoCo's communication budget (1/500 of data-parallel), by the planner
        lrs = replay_lrs(args)
        result = plan(qsr_config, lrs, args.get_warmup_steps(args.max_steps))
        assert qsr_config.qsr_alpha == 0.0059 and 0.0019 < result.comm_volume_vs_ddp <= 0.002


def replay_lrs(args) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(args.max_steps),
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lrs = []
    for _ in range(args.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_vit_qsr_recipe_replays_the_official_schedule():
    # Trainer's own lr schedule + the planner give the official code's schedule (the official code's rule replayed): 9,711 syncs,
    # first round longer than H_base at step 17,876, last round 8,142 steps.
    _, _, qsr_config, args = parse_recipe(ROOT / "recipes/vit_b16_imagenet1k/qsr.yaml", [])
    result = plan(qsr_config, replay_lrs(args), args.get_warmup_steps(args.max_steps))
    assert result.syncs == 9_711 and result.first_step_above(4) == 17_876 and result.round_lengths[-1] == 8_142
    assert abs(result.comm_volume_vs_ddp - 0.10375) < 1e-5


def test_cli_overrides_win_over_the_yaml():
    argv = ["--max_steps", "8", "--qsr_alpha", "0.05", "--image_size", "32", "--output_dir", "somewhere"]
    _, data_args, qsr_config, args = parse_recipe(ROOT / "recipes/demo/qsr.yaml", argv)
    assert (args.max_steps, qsr_config.qsr_alpha, data_args.image_size, args.output_dir) == (8, 0.05, 32, "somewhere")
    _, _, qsr_config, args = parse_recipe(ROOT / "recipes/demo/qsr.yaml", [])
    assert (args.max_steps, qsr_config.qsr_alpha) == (400, 0.022)


def test_parse_without_recipe_uses_defaults():
    model_args, data_args, qsr_config, _ = parse_recipe(None, ["--qsr_rule", "constant", "--output_dir", "x"])
    assert model_args.model_type == "demo_vit" and data_args.dataset_name == "fashion_mnist_local"
    assert qsr_config.qsr_rule == "constant" and qsr_config.qsr_h_base == 4


def test_unknown_yaml_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"qsr_rule": "constant", "qsr_hbase": 4, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match="qsr_hbase"):
        parse_recipe(recipe, [])


def test_unknown_cli_flag_fails():
    with pytest.raises((ValueError, SystemExit)):
        parse_recipe(ROOT / "recipes/demo/qsr.yaml", ["--qsr_hbase", "4"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["--qsr_rule", "qsr", "--qsr_alpha", "-1"], "qsr_alpha"),
        (["--randaugment_severity", "15"], "randaugment_severity"),
        (["--randaugment_depth", "-1"], "randaugment_depth"),
        (["--crop_scale_min", "0"], "crop_scale_min"),
    ],
)
def test_invalid_values_fail_before_training(override, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(ROOT / "recipes/demo/parallel.yaml", override)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("absent.yaml", None, "absent.yaml: not found"),
        ("recipe.json", "{}", "recipe.json: not a .yaml file"),
        ("alpha.yaml", "qsr_rule: qsr\nqsr_alpha: [0.02]\n", "qsr_alpha must be float or None"),
        ("h.yaml", "qsr_rule: constant\nqsr_h_base: true\n", "qsr_h_base must be int"),
        ("inf.yaml", "qsr_rule: qsr\nqsr_alpha: .inf\n", "qsr_alpha must be > 0 and finite"),
    ],
)
def test_bad_recipe_files_name_the_problem(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_recipe(tmp_path / name, ["--output_dir", str(tmp_path)])


def test_non_mapping_recipe_fails(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_recipe(recipe, [])


def test_parser_covers_the_four_dataclasses():
    assert [cls.__name__ for cls in make_parser().dataclass_types] == [
        "ModelArguments",
        "DataArguments",
        "QSRConfig",
        "RecipeTrainingArguments",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2
    if path.stem == "multi_cpu":
        assert config.num_processes == 2 and config.num_machines == 1
    if path.stem.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == 0, "only ZeRO stage 0 can take local steps"


def test_recipes_readme_commands_name_existing_files():
    readme = (ROOT / "recipes" / "README.md").read_text()
    named = set(re.findall(r"(?:recipes|accelerate_configs)/[\w./-]+\.yaml", readme))
    assert named, "the README should name recipes"
    missing = [p for p in named if not (ROOT / p).is_file()]
    assert not missing, f"recipes/README.md names missing files: {missing}"
    for recipe in RECIPES:
        assert rel(recipe) in readme, f"{rel(recipe)} is not in recipes/README.md"


def test_recipe_path_without_yaml_says_what_to_do():
    with pytest.raises(ValueError, match=r"did you mean recipes/demo/qsr\.yaml"):
        recipe_path(["recipes/demo/qsr", "--max_steps", "2"])
    with pytest.raises(ValueError, match="nope.yaml: not found"):
        recipe_path(["recipes/demo/nope.yaml"])
    argv = ["recipes/demo/qsr.yaml", "--max_steps", "2"]
    assert recipe_path(argv) == "recipes/demo/qsr.yaml" and argv == ["--max_steps", "2"]
    assert recipe_path(["--max_steps", "2"]) is None


def test_a_run_does_not_overwrite_another_runs_output_silently(tmp_path):
    checkpoint = tmp_path / "checkpoint-400"
    checkpoint.mkdir()
    for rank in (0, 1):
        (checkpoint / f"qsr_state_rank{rank}.pt").touch()
    _, _, _, args = parse_recipe(ROOT / "recipes/demo/qsr.yaml", ["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="2-process run.*--overwrite_output_dir true.*--resume_from_checkpoint"):
        check_output_dir(args)
    for ok in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "last"]):
        check_output_dir(parse_recipe(ROOT / "recipes/demo/qsr.yaml", ["--output_dir", str(tmp_path), *ok])[3])
    check_output_dir(parse_recipe(ROOT / "recipes/demo/qsr.yaml", ["--output_dir", str(tmp_path / "new")])[3])


def test_reproduce_line_names_the_accelerate_config(monkeypatch):
    _, _, _, args = parse_recipe(ROOT / "recipes/demo/qsr.yaml", [])
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    line = reproduce_command("recipes/demo/qsr.yaml", ["--max_steps", "8"], args)
    assert line == (
        "accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes 2 "
        "-m qsr_hf.training.train recipes/demo/qsr.yaml --max_steps 8"
    )


def test_plan_of_a_recipe_prints_alpha_short_and_where_the_plot_went(tmp_path, capsys):
    from qsr_hf.cli import plan_main

    png = tmp_path / "plan.png"
    summary = plan_main([str(ROOT / "recipes/demo/qsr.yaml"), "--target-comm", "0.2", "--plot", str(png)])
    out = capsys.readouterr().out
    assert png.is_file() and f"plot: {png.resolve()}" in out and summary["plot"] == str(png.resolve())
    alpha = out.split("alpha=")[1].split()[0]
    assert len(alpha.split(".")[-1].lstrip("0")) <= 6 and float(alpha) == pytest.approx(summary["alpha"], rel=1e-5)
