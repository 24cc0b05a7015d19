"""Language-model pieces: the stdlib corpus split, the local BPE tokenizer, packing, the causal-LM model, and the
streamed (hub-format) path through the real Trainer on 2 gloo processes: each rank reads its own shards, no batch is
dispatched from rank 0, and the loss is each rank's own token mean under gradient accumulation."""

import json
import re

import datasets
import numpy as np
import pytest
import torch
from testing_utils import count_collectives, run_distributed
from transformers import AutoTokenizer, TrainerCallback

from qsr_hf.training import corpus, lm_data, packing
from qsr_hf.training.lm_models import build_causal_lm
from qsr_hf.training.tokenizer import train_bpe_tokenizer
from qsr_hf.training.train import ModelArguments, parse_recipe


SAMPLE = "def f(x):\n\treturn {'é': x ** 2}  # ünïcode, tabs and  spaces\n\n\nclass A:\n    pass\n"


@pytest.fixture(scope="module")
def stdlib_texts():
    return list(corpus.load_stdlib_corpus("train", max_samples=40)["text"])


@pytest.fixture(scope="module")
def tokenizer(stdlib_texts):
    return train_bpe_tokenizer(stdlib_texts, vocab_size=512, model_max_length=64)


def test_stdlib_split_is_by_file_and_fixed_by_the_path(tmp_path):
    files = corpus.stdlib_files()
    assert files == sorted(files) and len(files) > 300
    assert not [f for f in files if {"test", "tests", "idle_test", "site-packages"} & set(f.split("/")[:-1])]
    splits = {f: corpus.split_of(f) for f in files}
    validation = [f for f, s in splits.items() if s == "validation"]
    assert 0.02 < len(validation) / len(files) < 0.1
    # the split of a file depends on its path only: the same in a folder holding a few other files
    for rel in [*validation[:3], files[0]]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    (tmp_path / "test").mkdir(exist_ok=True)
    (tmp_path / "test" / "test_x.py").write_text("excluded\n")
    val = corpus.load_stdlib_corpus("validation", root=tmp_path)
    train = corpus.load_stdlib_corpus("train", root=tmp_path)
    assert list(val["path"]) == validation[:3] and list(train["path"]) == [files[0]]
    assert val[0]["text"] == f"# {validation[0]}\n"
    assert corpus.corpus_version().startswith(("CPython 3.", "PyPy 3."))
    with pytest.raises(ValueError, match="splits"):
        corpus.load_stdlib_corpus("test")


def test_stdlib_splits_leave_out_generated_files_and_no_file_dominates():
    root = corpus.stdlib_root()
    generated = {f for f in corpus.stdlib_files() if corpus.is_generated((root / f).read_text(errors="replace"))}
    assert {"pydoc_data/topics.py", "encodings/cp865.py", "encodings/cp858.py", "token.py"} <= generated
    assert not {"ast.py", "_compat_pickle.py", "lib2to3/pgen2/parse.py"} & generated  # "generated" in prose only
    for split in corpus.SPLITS:
        ds = corpus.load_stdlib_corpus(split)
        assert not generated & set(ds["path"]), split
        sizes = [len(t) for t in ds["text"]]
        assert max(sizes) <= corpus.MAX_FILE_CHARS
        assert max(sizes) / sum(sizes) < 0.1, f"one {split} file holds {max(sizes) / sum(sizes):.1%} of the text"
    cut = corpus.truncate("a\nbb\nccc\n", 8)
    assert cut == "a\nbb\n" and corpus.truncate("abc", None) == "abc"


def test_tokenizer_round_trips_and_is_saved_with_the_model(tokenizer, stdlib_texts, tmp_path):
    for text in [SAMPLE, stdlib_texts[0][:3000]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())  # BPE merges compress
    assert len(tokenizer) == 512 and tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert train_bpe_tokenizer(stdlib_texts, vocab_size=512).get_vocab() == tokenizer.get_vocab()  # deterministic
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"] and loaded.eos_token_id == 0
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["x"], vocab_size=100)


def test_pack_ids_joins_documents_with_eos_and_drops_the_tail():
    blocks = packing.pack_ids([[1, 2, 3], [4, 5], [6]], eos_token_id=0, block_size=3)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert packing.pack_ids([[1, 2, 3]], 0, 3).tolist() == [[1, 2, 3]]  # the trailing EOS alone is dropped
    with pytest.raises(ValueError, match="block_size"):
        packing.pack_ids([[1]], 0, 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_packed_blocks_have_fixed_length_and_labels_equal_inputs(tokenizer, stdlib_texts, streaming):
    ds = datasets.Dataset.from_dict({"text": stdlib_texts[:8], "other": list(range(8))})
    packed = packing.pack_dataset(ds.to_iterable_dataset() if streaming else ds, tokenizer, block_size=32)
    rows = list(packed)
    assert set(rows[0]) == {"input_ids", "attention_mask", "labels"}
    ids = torch.tensor(np.array([r["input_ids"] for r in rows]))  # lists, or numpy rows when streamed
    assert ids.shape[1] == 32 and torch.equal(ids, torch.tensor(np.array([r["labels"] for r in rows])))
    assert (np.array([r["attention_mask"] for r in rows]) == 1).all()  # no padding, no cross-document masking
    # the blocks are the documents' tokens, in order, each document followed by EOS
    expected = packing.token_blocks(stdlib_texts[:8], tokenizer, 32)
    assert torch.equal(ids, expected) and int((ids == tokenizer.eos_token_id).sum()) in (7, 8)


def test_causal_lm_is_sized_to_the_tokenizer_and_trains_without_cache(tokenizer):
    model = build_causal_lm("demo_llama", tokenizer, config_overrides="num_hidden_layers=1")
    assert model.config.vocab_size == 512 and model.config.use_cache is False
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id
    out = model(input_ids=torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2, 8, dtype=torch.long))
    assert out.past_key_values is None and out.logits.shape == (2, 8, 512)
    with pytest.raises(ValueError, match="llama_150m"):
        build_causal_lm("demo_vit", tokenizer)
    with pytest.raises(ValueError, match="not a causal-lm model"):
        ModelArguments(task="causal-lm", model_type="demo_vit")


def write_hub_like_text(root, shards=4, docs=8):
    """A text dataset laid out as on the hub (``data/{split}-0000i-of-0000n.jsonl``): every document is unique."""
    (root / "data").mkdir(parents=True)
    for split, n in (("train", shards), ("validation", 1)):
        for s in range(n):
            words = [" ".join(f"v{s}_{d}_{i}" for i in range(40)) for d in range(docs)]  # unique tokens per shard
            lines = [json.dumps({"text": f"{split} shard {s} doc {d}: {words[d]}"}) for d in range(docs)]
            (root / "data" / f"{split}-{s:05d}-of-{n:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return root


class StepLog(TrainerCallback):
    """How many collectives the process had made when each optimizer step ended."""

    def __init__(self, log):
        self.log, self.at_step_end = log, []

    def on_step_end(self, args, state, control, **kw):
        self.at_step_end.append(len(self.log))


def _streamed_trainer(data_dir, tokenizer_dir, out_dir, *extra):
    """The runner's LM Trainer on a streamed local dataset, with a spy on the loss: (trainer, args, rebuild, seen)."""
    from qsr_hf.training.lm_trainer import build_lm_trainer
    from qsr_hf.training.train import make_callbacks, prepare_training_args

    argv = ["--dataset_name", data_dir, "--streaming", "true", "--tokenizer_name", tokenizer_dir]
    argv += ["--block_size", "16", "--max_steps", "4", "--per_device_train_batch_size", "2"]
    argv += ["--gradient_accumulation_steps", "2", "--warmup_steps", "0", "--max_eval_samples", "3"]
    argv += ["--qsr_rule", "constant", "--qsr_h_base", "4", "--output_dir", out_dir, "--save_strategy", "no"]
    # logging_steps past the end: Trainer's loss logging gathers the loss across ranks at each log (not per step)
    argv += ["--logging_steps", "100", "--disable_tqdm", "true", "--max_grad_norm", "0", *extra]
    model_args, data_args, qsr_config, args = parse_recipe("recipes/demo/lm_qsr.yaml", argv)
    prepare_training_args(args)

    def rebuild():
        return build_lm_trainer(model_args, data_args, args, make_callbacks(qsr_config))

    trainer = rebuild()
    seen = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():  # the micro-batch's own token mean, from the unwrapped model
            mean = trainer.accelerator.unwrap_model(model)(**inputs).loss
        seen.append((inputs["input_ids"].tolist(), int(num_items_in_batch), float(loss.detach()), float(mean)))
        return loss

    trainer.compute_loss = spy
    return trainer, args, rebuild, seen


def _streamed_lm_run(rank, world_size, data_dir, tokenizer_dir, out_dir):
    trainer, args, rebuild, seen = _streamed_trainer(data_dir, tokenizer_dir, out_dir)
    log = []
    steps = StepLog(log)
    trainer.add_callback(steps)
    with count_collectives(log):
        trainer.train()
    names = [name for name, _ in log]
    # control: accelerate's default for a stream (dispatch_batches=True) is seen by the same counter
    args.accelerator_config.dispatch_batches, args.max_steps = True, 1
    dispatched = rebuild()
    control = []
    with count_collectives(control):
        dispatched.train()
    return {
        "seen": seen, "names": names, "at_step_end": steps.at_step_end, "eval": len(trainer.eval_dataset),
        "control": [name for name, _ in control],
    }  # fmt: skip


def test_streamed_text_is_read_per_rank_without_dispatch_and_loss_is_the_rank_token_mean(tmp_path, tokenizer):
    data_dir = write_hub_like_text(tmp_path / "corpus")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    results = run_distributed(
        _streamed_lm_run,
        data_dir=str(data_dir),
        tokenizer_dir=str(tmp_path / "tokenizer"),
        out_dir=str(tmp_path / "o"),
    )
    blocks = [{tuple(b) for ids, *_ in r["seen"] for b in ids} for r in results]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1], "each rank reads its own data"
    # each block decoded on its own: blocks joined in set order could make a marker across a boundary
    shards = [{int(m) for b in bs for m in re.findall(r"v(\d)_", tokenizer.decode(list(b)))} for bs in blocks]
    # accelerate shards the stream by file (4 shards, 2 ranks): rank 0 reads shards 0-1, rank 1 shards 2-3
    assert shards[0] and shards[0] <= {0, 1} and shards[1] and shards[1] <= {2, 3}, shards
    for r in results:
        assert "broadcast" not in r["names"], "batches must not be dispatched from rank 0"
        # no collective in steps 1-3 (no token-count gather, no gradient all-reduce); the sync at step 4 has them
        ends = r["at_step_end"]
        assert ends[0] == ends[1] == ends[2] < ends[3], (ends, r["names"])
        for ids, items, loss, mean in r["seen"]:
            # Trainer divides the summed token loss by THIS rank's count over the 2 micro-batches (2 x 2 x 15
            # predicted tokens), not the world's: the optimized loss is the rank's own token mean
            assert items == 2 * 2 * 15 and len(ids) == 2
            assert loss == pytest.approx(mean * (2 * 15) / items, rel=1e-5)
        assert r["eval"] > 0
        assert "broadcast" in r["control"], "the counter sees dispatched batches"


def test_text_loader_is_the_hub_loader(tmp_path):
    data_dir = write_hub_like_text(tmp_path / "corpus", shards=2, docs=3)
    streamed = lm_data.load_text_dataset(str(data_dir), "train", streaming=True, max_samples=4)
    assert isinstance(streamed, datasets.IterableDataset) and streamed.n_shards in (1, 2)
    heads = [r["text"].split(":")[0] for r in streamed]
    assert heads == [f"train shard {s} doc {d}" for s, d in [(0, 0), (0, 1), (0, 2), (1, 0)]]
    assert len(lm_data.load_text_dataset(str(data_dir), "validation")) == 3


def _streamed_resume_run(rank, world_size, data_dir, tokenizer_dir, out_dir):
    save = ["--save_strategy", "steps", "--save_steps", "2", "--qsr_h_base", "3"]  # a checkpoint inside a round
    full, _, _, full_seen = _streamed_trainer(data_dir, tokenizer_dir, out_dir, *save)
    full.train()
    resumed, _, _, resumed_seen = _streamed_trainer(data_dir, tokenizer_dir, out_dir + "_resumed", *save)
    resumed.train(resume_from_checkpoint=f"{out_dir}/checkpoint-2")
    params = [torch.cat([p.detach().flatten() for p in t.model.parameters()]) for t in (full, resumed)]
    return {"full": [ids for ids, *_ in full_seen], "resumed": [ids for ids, *_ in resumed_seen], "params": params}


@pytest.mark.slow
def test_streamed_run_resumes_on_the_same_batches(tmp_path, tokenizer):
    # Trainer skips a resumed stream's first batches by reading them again: with a fixed stream order the resumed
    # run trains on the uninterrupted run's batches and ends bitwise equal (the per-rank QSR state is exact)
    data_dir = write_hub_like_text(tmp_path / "corpus")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    kwargs = {"data_dir": str(data_dir), "tokenizer_dir": str(tmp_path / "tokenizer"), "out_dir": str(tmp_path / "o")}
    for r in run_distributed(_streamed_resume_run, **kwargs):
        assert len(r["full"]) == 8 and r["resumed"] == r["full"][4:]  # 2 micro-batches per step, steps 3-4
        assert torch.equal(r["params"][0], r["params"][1])
