"""Model card and Hub upload for models trained with qsr_hf.

The card records what a reader needs to judge a local-training run: the sync rule and its settings, the learning-rate
schedule it followed, how often the workers synchronized and what that cost relative to data-parallel training, and
the final accuracy.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import TrainingArguments

from qsr_hf.core.wire import bytes_per_value


_RULES: dict[str, str] = {
    "qsr": "QSR: H = max(H_base, ⌊(α/η)²⌋)",
    "linear": "linear rule: H = max(H_base, ⌊α/η⌋)",
    "cubic": "cubic rule: H = max(H_base, ⌊(α/η)³⌋)",
    "constant": "constant period: H = H_base",
    "post_local": "post-local SGD: H = 1 until the switch step, then H = H_base",
    "ddp": "data-parallel: gradients all-reduced every step (no local steps)",
}
_CITATION = """@inproceedings{gu2024quadratic,
  title     = {A Quadratic Synchronization Rule for Distributed Deep Learning},
  author    = {Xinran Gu and Kaifeng Lyu and Sanjeev Arora and Jingzhao Zhang and Longbo Huang},
  booktitle = {International Conference on Learning Representations},
  year      = {2024},
}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value)


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "| --- | --- |"] + [f"| {key} | {_fmt(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def training_facts(args: TrainingArguments, steps: int, max_steps: int) -> dict[str, Any]:
    """The schedule and optimizer facts of a run, for the card's "Training" table.

    Args:
        args ([`~transformers.TrainingArguments`]): the run's arguments.
        steps (`int`): optimizer steps taken.
        max_steps (`int`): planned optimizer steps (warm-up ratios are relative to it).

    Returns:
        `dict[str, Any]`: name -> value.
    """
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    return {
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "peak learning rate": args.learning_rate,
        "lr schedule": f"{schedule} {args.lr_scheduler_kwargs or ''}".strip(),
        "warm-up steps": args.get_warmup_steps(max_steps),
        "optimizer steps": steps,
        "global batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "processes": args.world_size,
        "weight decay": args.weight_decay,
        "gradient clipping": args.max_grad_norm or None,
        "precision": "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
    }


def build_model_card(
    model_name: str,
    dataset_name: str,
    qsr_config: Mapping[str, Any],
    training: Mapping[str, Any],
    qsr_summary: Mapping[str, float | int],
    eval_metrics: Mapping[str, float],
    command: str | None = None,
    base_model: str | None = None,
    figure: str | None = None,
    task: str = "image-classification",
) -> ModelCard:
    """Build the model card of a qsr_hf run.

    Args:
        model_name (`str`): name shown in the card and its ``model-index``.
        dataset_name (`str`): hub id or local name of the training data.
        qsr_config (`Mapping[str, Any]`): the ``qsr_*`` fields (``QSRConfig.to_dict()``).
        training (`Mapping[str, Any]`): schedule facts, e.g. ``learning_rate``, ``lr_scheduler_type``,
            ``warmup_steps``, ``max_steps``, ``global_batch_size``, ``world_size``, ``optimizer``.
        qsr_summary (`Mapping[str, float | int]`): communication counters (``qsr/syncs``, ``qsr/comm_volume_vs_ddp``,
            ``qsr/H``...), from ``QSRCallback.summary()``.
        eval_metrics (`Mapping[str, float]`): final evaluation (``eval_top1``, ``eval_top5``, ``eval_loss``), fractions.
        command (`str`, *optional*): the command that reproduces the run.
        base_model (`str`, *optional*): hub checkpoint the run started from; `None` for training from scratch.
        figure (`str`, *optional*): file name, next to the card, of the run's figure (`qsr_hf.training.report`).
        task (`str`, defaults to ``"image-classification"``): or ``"causal-lm"`` (card metric: perplexity).

    Returns:
        [`huggingface_hub.ModelCard`]: the card; ``card.save(path)`` writes it.

    Example:

    ```python
    >>> card = build_model_card("vit", "fashion_mnist_local", {"qsr_rule": "qsr"}, {}, {"qsr/syncs": 3}, {})
    >>> "qsr_hf" in card.content
    True
    ```
    """
    rule = str(qsr_config.get("qsr_rule", "qsr"))
    lm = task == "causal-lm"
    pipeline, metric, key = (
        ("text-generation", "perplexity", "eval_perplexity") if lm else (task, "accuracy", "eval_top1")
    )
    value = eval_metrics.get(key)
    eval_results = None
    if value is not None:
        eval_results = [
            EvalResult(
                task_type=pipeline,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                metric_type=metric,
                metric_value=float(value),
            )
        ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline,
        tags=[pipeline, "qsr_hf", "local-sgd", f"sync-rule-{rule}"],
        datasets=None if "_local" in dataset_name else [dataset_name],
        metrics=[metric],
        base_model=base_model,
        eval_results=eval_results,
    )
    settings = {"rule": _RULES.get(rule, rule)} | {k: v for k, v in qsr_config.items() if k != "qsr_rule"}
    ratio = qsr_summary.get("qsr/comm_volume_vs_ddp")
    comm = dict(qsr_summary)
    if ratio is not None:
        comm["communication vs data-parallel"] = f"{100 * float(ratio):.2f}%"
    if qsr_config.get("qsr_compress_delta"):  # the round's change in a wire format (qsr_hf.sync.compressed)
        fmt = str(qsr_config.get("qsr_compress_format", "bf16"))
        comm["sync format"] = f"{fmt} deltas, {bytes_per_value(fmt):.4g} B/param per sync (fp32: 4)" + "".join(
            note
            for key, note in (("qsr_compress_error_feedback", ", error feedback"), ("qsr_overlap_sync", ", in flight"))
            if qsr_config.get(key)
        )
    results = {
        k.removeprefix("eval_"): v for k, v in eval_metrics.items() if not k.endswith(("_per_second", "runtime"))
    }
    kind = "Causal language model" if lm else "Image classifier"
    origin = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})" if base_model else "from scratch"
    body = f"""
# {model_name}

{kind} trained {origin} on `{dataset_name}` with local training synchronized by **{_RULES.get(rule, rule)}**,
using `qsr_hf` (the Quadratic Synchronization Rule of Gu et al., ICLR 2024, for Hugging Face
Trainer/Accelerate/DeepSpeed). Each worker takes H optimizer steps on its own data, then all workers average their
parameters; H is set at the start of each round from the learning rate η of that step.

## Synchronization settings

{_table(settings)}

## Communication

{_table(comm)}

"Communication vs data-parallel" is the bytes all-reduced for parameter averaging divided by the bytes a
data-parallel run of the same length all-reduces for gradients (one all-reduce per optimizer step).

## Training

{_table(training)}

## Results

{_table(results)}
"""
    if figure:
        body += figure_section(figure)
    if command:
        body += f"\n## Reproduce\n\n```bash\n{command}\n```\n"
    body += f"\n## Citation\n\n```bibtex\n{_CITATION}\n```\n"
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def figure_section(figure: str) -> str:
    """The card's "Training curves" section, embedding the PNG ``figure`` (a path relative to the card)."""
    return f"\n## Training curves\n\n![loss with the syncs marked, H per round, communication]({figure})\n"


def embed_figure(output_dir: str | Path, figure: str) -> bool:
    """Add :func:`figure_section` to an existing card in ``output_dir`` unless it embeds ``figure`` already.

    Returns:
        `bool`: whether the card was changed (`False` also when there is no card).
    """
    path = Path(output_dir) / "README.md"
    if not path.is_file() or f"]({figure})" in path.read_text():
        return False
    card = ModelCard.load(path)
    card.text += figure_section(figure)
    card.save(path)
    return True


def save_model_card(card: ModelCard, output_dir: str | Path) -> Path:
    """Write ``card`` to ``output_dir/README.md`` and return the path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model trained with qsr_hf",
    api: HfApi | None = None,
) -> str:
    """Upload a finished run's folder (model, image processor, model card, metrics) to a Hub model repo.

    Intermediate checkpoints and per-rank QSR state are left out: they are for resuming, not for users.

    Args:
        output_dir (`str` or `Path`): the run's output folder.
        repo_id (`str`): ``user/name`` (created if missing).
        token (`str`, *optional*): Hub token; default: the logged-in one.
        private (`bool`, *optional*): visibility when the repo is created.
        commit_message (`str`): commit message.
        api ([`huggingface_hub.HfApi`], *optional*): client to use (tests pass a stand-in).

    Returns:
        `str`: URL of the commit.
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "qsr_state_rank*", "runs/**", "*.pt", "*.pth"],
    )
    return str(getattr(commit, "commit_url", commit))
