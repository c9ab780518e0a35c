"""`picochat base-eval` end to end on a tiny saved checkpoint, and its clear errors."""

import csv
import dataclasses
import json
import math
import shutil

import pytest
import torch

from picochat import checkpoint, core_eval
from picochat.common import PicochatError
from picochat.gpt import build_model, config_from_depth
from picochat.stages import base_eval

TASKS = ["copa", "lambada_openai", "winograd"]  # core.yaml order, which results keep
NAME = "CORE (partial: 3/22 tasks, at most 11 examples per task)"


@pytest.fixture
def bundle(monkeypatch, core_bundle, tmp_path):
    """The generated 22-task bundle less squad, as a bundle whose download lost a file."""
    folder = shutil.copytree(core_bundle, tmp_path / "bundle")
    (folder / "eval_data" / "reading_comprehension" / "squad.jsonl").unlink()
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(folder))
    return folder


def save_tiny_checkpoint(vocab_size, step=7, tag="d2"):
    torch.manual_seed(0)
    config = config_from_depth(2, vocab_size, max_seq_len=128, aspect_ratio=32, head_dim=32)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():  # something less trivial than the zero-output init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    meta = {"step": step, "model_config": dataclasses.asdict(config)}
    checkpoint.save_checkpoint(checkpoint.checkpoint_dir("base", tag), step, model.state_dict(), {}, meta, rank=0)
    return model


def read_csv(path):
    with open(path, newline="") as f:
        return [[cell.strip() for cell in row] for row in csv.reader(f)]


def test_end_to_end(picochat_home, small_tokenizer, pretrain_dir, bundle, capsys):
    small_tokenizer.save(picochat_home / "tokenizer")
    save_tiny_checkpoint(small_tokenizer.get_vocab_size())
    common = ["--device-type", "cpu", "--tasks", ",".join(TASKS), "--max-per-task", "11", "--core-batch-tokens", "2000"]
    base_eval.main(["--eval", "bpb,sample", "--dataset", str(pretrain_dir), "--device-batch-size", "2",
                    "--split-tokens", "1000", "--num-samples", "2", *common])
    base_eval.main(["--eval", "core", *common])
    out = capsys.readouterr().out

    folder = picochat_home / "base_eval" / "d2"
    record = json.loads((folder / "base_model_000007.json").read_text())
    assert (record["model_tag"], record["step"]) == ("d2", 7)
    # bpb: 1000 tokens round down to 3 steps of 2 rows x 128 tokens; one JSON file gathers both runs
    assert record["bpb"]["split_tokens"] == 768
    assert all(0 < record["bpb"][s] < math.inf for s in ("train", "val"))
    assert len(record["samples"]["conditioned"]) == 7 and len(record["samples"]["unconditioned"]) == 2
    assert record["samples"]["conditioned"][0].startswith("The capital of France is")
    assert "'The capital of France is' -> " in out and "val bpb:" in out

    core = record["core"]
    assert list(core["tasks"]) == TASKS and core["metric_name"] == NAME
    assert core["core"] is None and core["examples"] == 33
    rows = read_csv(folder / "base_model_000007.csv")
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert [r[0] for r in rows[1:]] == TASKS + [NAME]
    for row, label in zip(rows[1:], TASKS):
        assert float(row[1]) == pytest.approx(core["tasks"][label]["accuracy"], abs=1e-6)
        assert float(row[2]) == pytest.approx(core["tasks"][label]["centered"], abs=1e-6)
    assert rows[-1][1] == "" and float(rows[-1][2]) == pytest.approx(core["metric"], abs=1e-6)
    assert NAME in out and "examples/s" in out

    # the stage evaluated the saved weights: the same scores straight from the loaded model
    model, tokenizer, _ = checkpoint.load_model("base", "cpu", torch.float32)
    direct = core_eval.evaluate_core(model, tokenizer, "cpu", max_per_task=11, tasks=TASKS, batch_tokens=1)
    assert {k: v["accuracy"] for k, v in direct["tasks"].items()} == {
        k: v["accuracy"] for k, v in core["tasks"].items()}


def test_errors(picochat_home, small_tokenizer, bundle):
    config = base_eval.BaseEvalConfig(device_type="cpu", eval="core")
    # the bundle lacks squad: a full CORE stops before even looking for a checkpoint
    with pytest.raises(PicochatError, match="squad.jsonl"):
        base_eval.run(config)
    with pytest.raises(PicochatError, match="unknown CORE task"):
        base_eval.run(dataclasses.replace(config, tasks="copa,nope"))
    with pytest.raises(PicochatError, match="--eval takes"):
        base_eval.run(dataclasses.replace(config, eval="core,loss"))
    with pytest.raises(PicochatError, match="no base checkpoints"):
        base_eval.run(dataclasses.replace(config, tasks="copa"))
    small_tokenizer.save(picochat_home / "tokenizer")
    save_tiny_checkpoint(small_tokenizer.get_vocab_size() + 64)
    with pytest.raises(PicochatError, match="vocabulary of 1088 tokens.*1024"):
        base_eval.run(dataclasses.replace(config, tasks="copa"))
    with pytest.raises(PicochatError, match="no complete checkpoint at step 3"):
        base_eval.run(dataclasses.replace(config, tasks="copa", step=3))


def test_csv_layout_matches_the_reference_files(tmp_path):
    """The bundle's published results (reference_results/*.csv) are padded columns: label to 35
    characters, numbers as %.6f to 10, the mean with an empty accuracy. Written out by hand here."""
    reference = ("Task                               , Accuracy  , Centered  \n"
                 "hellaswag_zeroshot                 , 0.308504  , 0.078006  \n"
                 "bigbench_language_identification   , 0.256600  , 0.182178  \n"
                 "CORE                               ,           , 0.113891  \n")
    result = {"tasks": {"hellaswag_zeroshot": {"accuracy": 0.308504, "centered": 0.078006},
                        "bigbench_language_identification": {"accuracy": 0.2566, "centered": 0.182178}},
              "metric_name": "CORE", "metric": 0.113891}
    base_eval.write_core_csv(result, tmp_path / "gpt2.csv")
    assert (tmp_path / "gpt2.csv").read_text() == reference

