"""The whole pipeline at the smallest sizes, stage after stage in one $PICOCHAT_HOME, as runs/tiny.sh
chains them: tok-train, tok-eval, base-train, base-eval, chat-sft, chat-eval, chat-rl, chat-eval,
report, chat-cli. Each stage must leave its artefacts, and the report every section and plot."""

import importlib
import itertools
import json
import re
import shlex
import subprocess
import sys

import pytest
from chat_data import write_task_mirror
from conftest import REPO

from picochat import checkpoint as ckpt
from picochat import cli
from picochat.stages import base_eval, base_train, chat_eval, chat_rl, chat_sft, report, tok_eval, tok_train


@pytest.fixture
def home(tmp_path, monkeypatch, core_bundle):
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.setenv("PICOCHAT_TASK_DATA_URL", str(write_task_mirror(tmp_path / "task_mirror")))
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(core_bundle))
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")
    return home


def test_every_stage_in_a_row(home, pretrain_dir, tmp_path):
    data = str(pretrain_dir)
    tok_train.run(tok_train.TokTrainConfig(max_chars=2_000_000, vocab_size=1024, dataset=data))
    tok_eval.run(tok_eval.TokEvalConfig(dataset=data))
    assert (home / "tokenizer" / "tokenizer.pkl").exists() and (home / "tok_eval" / "tok_eval.md").exists()

    base_train.run(base_train.TrainConfig(
        depth=2, max_seq_len=64, head_dim=64, window_pattern="L", device_batch_size=4, total_batch_size=512,
        embedding_lr=3.0, unembedding_lr=0.08, matrix_lr=0.2, num_iterations=20, warmup_steps=2, eval_every=10,
        eval_tokens=1024, core_metric_every=-1, sample_every=-1, save_every=-1, dataset=data, model_tag="d2",
        compile="off", device_type="cpu"))
    assert ckpt.complete_steps(home / "base_checkpoints" / "d2") == [20]
    base_eval.run(base_eval.BaseEvalConfig(model_tag="d2", max_per_task=12, tasks="copa,arc_easy",
                                           device_batch_size=4, split_tokens=1024, dataset=data, device_type="cpu",
                                           num_samples=1))
    assert (home / "base_eval" / "d2" / "base_model_000020.json").exists()

    chat_sft.run(chat_sft.SFTConfig(device_type="cpu", compile="off", num_iterations=4, device_batch_size=2,
                                    total_batch_size=256, eval_every=2, eval_tokens=512, chatcore_every=-1,
                                    mmlu_epochs=1, gsm8k_epochs=1, spelling_bee=20, simple_spelling=20))
    assert ckpt.complete_steps(home / "sft_checkpoints" / "d2") == [4]
    evaluate = dict(task_name="ARC-Easy|GSM8K", max_problems=4, max_new_tokens=16, batch_size=4, device_type="cpu")
    chat_eval.run(chat_eval.ChatEvalConfig(source="sft", **evaluate))
    assert (home / "chat_eval" / "sft_d2" / "step_000004_ARC-Easy-GSM8K_max4.json").exists()

    chat_rl.run(chat_rl.RLConfig(device_type="cpu", num_iterations=2, examples_per_step=2, num_samples=2,
                                 device_batch_size=2, max_new_tokens=8, eval_every=2, eval_examples=2,
                                 eval_samples=2))
    assert ckpt.complete_steps(home / "rl_checkpoints" / "d2") == [2]
    chat_eval.run(chat_eval.ChatEvalConfig(source="rl", **evaluate))

    report.run(report.ReportConfig(copy_to=str(tmp_path / "here")))
    text = (home / "report" / "report.md").read_text()
    for title in ("## Environment", "## Tokenizer", "## base-train", "### CORE (base-eval)", "## chat-sft",
                  "## chat-rl", "## Chat evaluation (chat-eval)", "## Samples", "## Plots"):
        assert f"\n{title}\n" in text, title
    samples = text.split("## Samples")[1]
    assert "```\n" in samples and "sft model, chat-eval answers:" in samples and "- GSM8K (" in samples
    assert "not run" not in text.split("## Chat evaluation")[0]  # every stage before it ran
    assert "| task | base (not run) | sft (step 4) | rl (step 2) |" in text
    assert "|  | base-train ran on | this report written on |" in text and "| device | cpu | cpu |" in text
    assert "CORE (partial" in text  # 2 tasks of the bundle, capped: named partial
    for name in ("base_loss.png", "base_val_bpb.png", "base_speed.png", "sft.png", "rl.png"):
        assert f"]({name})" in text and (home / "report" / name).read_bytes().startswith(b"\x89PNG"), name
    assert (tmp_path / "here" / "report.md").exists()
    for script in RECIPES:  # the recipes at least parse
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script

    # as a user runs it: the most trained stage (rl) answers
    done = subprocess.run([sys.executable, "-m", "picochat", "chat-cli", "-p", "Hello!", "--max-tokens", "8",
                           "-t", "0", "--device-type", "cpu"], capture_output=True, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    assert json.loads((home / "rl_checkpoints" / "d2" / "meta_000002.json").read_text())["source_checkpoint"] == \
        {"stage": "sft", "tag": "d2", "step": 4}


RECIPES = ("runs/tiny.sh", "runs/speedrun.sh")
# what the recipes' variables stand for; a new one must be added here, on purpose
RECIPE_VARIABLES = {"DATASET": "climbmix", "TAG": "d24", "RUN": "dummy", "FP8_FLAG": "--fp8"}  # FP8_FLAG: on an H100


def recipe_commands(script: str) -> list[list[str]]:
    """Every `picochat <stage> ...` and `... -m picochat <stage> ...` command of a recipe, as argv
    (variables filled in from RECIPE_VARIABLES; quoted text such as an echo's is not a command)."""
    text = (REPO / script).read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token == "picochat" and i + 1 < len(tokens) and tokens[i + 1] in cli.STAGES:
                argv = list(itertools.takewhile(lambda t: t not in (";", "&", "&&", "||", "|"), tokens[i + 1:]))
                commands.append([re.sub(r"\$\{?(\w+)\}?", lambda m: RECIPE_VARIABLES[m.group(1)], t) for t in argv])
    return commands


@pytest.mark.parametrize("script", RECIPES)
def test_the_recipes_commands_are_ones_the_stages_accept(script, monkeypatch):
    """Each stage's own argument parser takes every command of the recipe (a renamed or removed
    flag fails here, not an hour into a GPU run); run() is replaced so nothing executes."""
    commands = recipe_commands(script)
    stages = [argv[0] for argv in commands]
    expected = {"runs/tiny.sh": ["download", "tok-train", "tok-eval", "base-train", "base-eval", "chat-sft",
                                 "chat-eval", "report", "chat-cli"],
                "runs/speedrun.sh": ["download", "download", "tok-train", "tok-eval", "base-train", "base-eval",
                                     "chat-sft", "chat-eval", "chat-rl", "chat-eval", "report", "report"]}[script]
    assert stages == expected
    for stage, *args in commands:
        module = importlib.import_module(cli.STAGES[stage][0])
        configs = []
        monkeypatch.setattr(module, "run", configs.append)
        module.main(args)
        assert len(configs) == 1, (stage, args)
    if script == "runs/speedrun.sh":
        base_train_args = commands[stages.index("base-train")][1:]
        assert {"--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16", "--fp8"} <= \
            set(base_train_args)  # the reference's speedrun settings
