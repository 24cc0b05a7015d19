"""benchmarks/lm_study.py's core on a tiny setting: every method trains on the same tokens, communicates what the
planner says, and the outer step changes the result."""

import sys
from pathlib import Path

import torch

from qsr_hf.analysis.planner import plan


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm_study


def test_lm_study_methods_on_a_tiny_run(tmp_path):
    argv = "--steps 16 --h 4 --h-base 2 --max-files 6 --vocab-size 300 --hidden 32 --layers 1 --global-batch 8"
    args = lm_study.make_parser().parse_args([*argv.split(), "--val-blocks", "8"])
    threads = torch.get_num_threads()
    try:
        setup = lm_study.prepare_data(args, tmp_path)
        lm_study._init_worker(str(tmp_path))
        configs = lm_study.method_configs(args)
        runs = {
            m: lm_study.run_one({"args": vars(args), "method": m, "seed": 0, "config": c and c.to_dict()})
            for m, c in configs.items()
        }
    finally:
        torch.set_num_threads(threads)
    assert list(runs) == ["ddp", "constant_h4", "constant_h4_nesterov", "qsr_h4", "qsr_h4_nesterov"]
    assert setup["val_blocks"] == 8
    assert {r["tokens"] for r in runs.values()} == {16 * 8 * args.block_size}, "equal token budget"
    assert runs["ddp"]["syncs"] == 16 and runs["ddp"]["comm_vs_ddp"] == 1.0
    lrs, warmup = lm_study.lr_schedule(args)
    for method, config in configs.items():
        if config is not None:
            assert runs[method]["syncs"] == plan(config, lrs, warmup).syncs, method
    assert runs["constant_h4"]["comm_vs_ddp"] == 0.25
    assert runs["qsr_h4"]["comm_vs_ddp"] <= 0.25, "alpha_for_comm_budget: no more than constant H"
    assert len({h for _, h in runs["qsr_h4"]["h_changes"]}) > 1, "QSR's rounds grow as the lr decays"
    assert runs["qsr_h4_nesterov"]["val_loss"] != runs["qsr_h4"]["val_loss"]
    assert runs["constant_h4_nesterov"]["val_loss"] != runs["constant_h4"]["val_loss"]
    rows, comparisons = lm_study.summarize(list(runs.values()), list(configs))
    assert rows[0]["diff_vs_ddp_mean"] == 0.0
    pairs = {(c["method"], c["baseline"]) for c in comparisons}
    assert ("qsr_h4_nesterov", "constant_h4_nesterov") in pairs and ("qsr_h4", "constant_h4") in pairs
