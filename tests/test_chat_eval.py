"""chat-eval: categorical and generative scoring on a real GPT whose logits a wrapper pushes
towards known answers (so the score has an independent truth), pass@n, ChatCORE and its naming,
and the stage, in one process and under torchrun, on a tiny base checkpoint and a task mirror."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from chat_data import (
    ARC_SCHEMA,
    GSM8K_SCHEMA,
    HUMANEVAL_ROWS,
    HUMANEVAL_SCHEMA,
    MMLU_SCHEMA,
    arc_rows,
    gsm8k_rows,
    mmlu_rows,
    write_split,
    write_words,
)
from conftest import REPO, free_port

from picochat import chat_eval
from picochat.chat_eval import CHATCORE_TASKS, centered, chatcore, evaluate_task
from picochat.checkpoint import load_model
from picochat.common import PicochatError
from picochat.engine import Engine
from picochat.stages import chat_eval as stage
from picochat.tasks import data
from picochat.tasks.arc import ARC
from picochat.tasks.gsm8k import GSM8K, extract_answer
from picochat.tasks.mmlu import MMLU

WORDS = ["apple", "banana", "cherry", "kiwi", "strawberry", "mississippi"]


@pytest.fixture(scope="module")
def eval_home(base_home, tmp_path_factory):
    """A copy of base_home (its d2 checkpoint) with a task mirror of every chat-eval task."""
    root = tmp_path_factory.mktemp("chat_eval")
    home = root / "home"
    shutil.copytree(base_home, home)
    mirror = root / "mirror"
    write_split(mirror, "allenai/ai2_arc", "ARC-Easy", "test", arc_rows(10), ARC_SCHEMA)
    write_split(mirror, "allenai/ai2_arc", "ARC-Challenge", "test", arc_rows(7), ARC_SCHEMA)
    write_split(mirror, "cais/mmlu", "all", "test", mmlu_rows(9), MMLU_SCHEMA, files=2)
    # questions of several lengths, so generation batches mix prompt lengths
    gsm8k = [dict(r, question=r["question"] + " Show your work." * (i % 3)) for i, r in enumerate(gsm8k_rows(6))]
    write_split(mirror, "openai/gsm8k", "main", "test", gsm8k, GSM8K_SCHEMA)
    write_split(mirror, "openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, HUMANEVAL_SCHEMA)
    write_words(mirror, WORDS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICOCHAT_HOME", str(home))
        mp.setenv(data.MIRROR_ENV, str(mirror))
        mp.setenv("PICOCHAT_DTYPE", "float32")
        yield home


@pytest.fixture(scope="module")
def model_and_tokenizer(eval_home):
    model, tokenizer, _ = load_model("base", "cpu", torch.float32, "d2")
    return model.eval(), tokenizer


def strip_bos(row, bos):
    """A prompt from a row that BOS pads on the left (generation) or the right (categorical)."""
    start = next(i for i, t in enumerate(row) if t != bos) - 1
    end = len(row)
    while row[end - 1] == bos:
        end -= 1
    return tuple(row[start:end])


class Forced:
    """A real GPT (forward, KV cache and all) whose logits get +100 on a chosen token.
    Categorical forward (no cache): at each prompt's last position, on answers[prompt].
    Generation: the rows of prompt p say scripts[p][sample] token by token."""

    def __init__(self, model, bos, answers=None, scripts=None, also=None):
        self.model, self.bos, self.answers, self.scripts, self.also = model, bos, answers, scripts, also
        self.config, self.compute_dtype, self.rotary_len = model.config, model.compute_dtype, model.rotary_len
        self.get_device = model.get_device
        self.prompts = []

    def __call__(self, idx, cache=None):
        logits = self.model(idx, cache=cache).clone()
        if cache is None:
            for row, ids in enumerate(idx.tolist()):
                prompt = strip_bos(ids, self.bos)
                if self.also is not None:  # a non-letter token that must not win: only letters compete
                    logits[row, len(prompt) - 1, self.also] += 200.0
                logits[row, len(prompt) - 1, self.answers[prompt]] += 100.0
            return logits
        if len(self.prompts) == 0 or idx.size(1) > 1:  # a prefill: remember each row's prompt
            self.prompts = [strip_bos(ids, self.bos) for ids in idx.tolist()]
            self.start = cache.pos
        i = cache.pos - self.start  # the index of the token these logits choose
        samples = idx.size(0) // len(self.prompts)
        for row in range(idx.size(0)):
            script = self.scripts[self.prompts[row // samples]][row % samples]
            if i < len(script):
                logits[row, -1, script[i]] += 100.0
        return logits


def letter_answers(task, tokenizer, letter_of):
    return {tuple(tokenizer.render_for_completion(c)): tokenizer.encode(letter_of(c))[0] for c in task}


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_categorical_forced_correct_scores_one_and_forced_a_the_share_of_a(model_and_tokenizer, batch_size):
    model, tok = model_and_tokenizer
    bos = tok.get_bos_token_id()
    for task in (ARC("ARC-Easy", "test"), MMLU("all", "test")):
        answer = lambda c: c["messages"][-1]["content"]
        right = Forced(model, bos, letter_answers(task, tok, answer), also=tok.encode(" the")[0])
        r = evaluate_task(task, right, tok, None, "cpu", batch_size=batch_size)
        assert (r["accuracy"], r["correct"], r["total"], r["task_size"]) == (1.0, len(task), len(task), len(task))
        always_a = Forced(model, bos, letter_answers(task, tok, lambda c: "A"))
        share_a = sum(answer(c) == "A" for c in task)
        assert 0 < share_a < len(task)
        r = evaluate_task(task, always_a, tok, None, "cpu", batch_size=batch_size)
        assert r["correct"] == share_a and r["accuracy"] == share_a / len(task)
    # -x: the first max_problems only
    r = evaluate_task(task, right, tok, None, "cpu", batch_size=batch_size, max_problems=5)
    assert (r["correct"], r["total"], r["task_size"]) == (5, 5, len(task))


def gsm8k_scripts(task, tok, num_samples, right_samples):
    """Per prompt, num_samples token scripts: the right "#### N" for the samples in
    right_samples(problem index), a wrong one for the others."""
    end = tok.encode_special("<|assistant_end|>")
    scripts = {}
    for k, c in enumerate(task):
        truth = int(extract_answer(c["messages"][-1]["content"][-1]["text"]))
        say = lambda n: tok.encode(f"So #### {n}") + [end]
        scripts[tuple(tok.render_for_completion(c))] = [say(truth if s in right_samples(k) else truth + 1)
                                                        for s in range(num_samples)]
    return scripts


def test_generative_batches_problems_and_counts_pass_at_n(model_and_tokenizer):
    model, tok = model_and_tokenizer
    bos = tok.get_bos_token_id()
    task = GSM8K("main", "test")
    assert len({len(tok.render_for_completion(c)) for c in task}) == 3  # batches mix prompt lengths
    for batch_size in (1, 4):
        # greedy: every even problem right
        scripts = gsm8k_scripts(task, tok, 1, lambda k: {0} if k % 2 == 0 else set())
        engine = Engine(Forced(model, bos, scripts=scripts), tok)
        r = evaluate_task(task, None, tok, engine, "cpu", batch_size=batch_size, max_new_tokens=20)
        assert (r["correct"], r["total"]) == (3, 6)
        # 3 samples, only the last of them right: pass@3 is 1, pass@1 0, pass@2 0
        for n, expected in [(3, 6), (1, 0), (2, 0)]:
            scripts = gsm8k_scripts(task, tok, n, lambda k: {2})
            engine = Engine(Forced(model, bos, scripts=scripts), tok)
            r = evaluate_task(task, None, tok, engine, "cpu", batch_size=batch_size, num_samples=n,
                              max_new_tokens=20, temperature=1.0)
            assert r["correct"] == expected, (batch_size, n)


def test_chatcore_value_and_names():
    full = {name: {"accuracy": acc, "max_problems": None} for name, acc in
            zip(CHATCORE_TASKS, [0.5, 0.25, 0.4, 0.1, 0.05])}
    # by hand: ARC-E (0.5-0.25)/0.75, ARC-C 0, MMLU 0.15/0.75, GSM8K 0.1, HumanEval 0.05
    expected = (1 / 3 + 0 + 0.2 + 0.1 + 0.05) / 5
    assert chatcore(full, capped=False) == ("ChatCORE", "chatcore", pytest.approx(expected, abs=1e-12))
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1
    three = {n: full[n] for n in ("ARC-Easy", "MMLU", "GSM8K")} | {"SpellingBee": {"accuracy": 1.0}}
    name, key, value = chatcore(three, capped=False)
    assert (name, key) == ("ChatCORE (partial: 3/5 tasks)", "chatcore_partial_3of5")
    assert value == pytest.approx((1 / 3 + 0.2 + 0.1) / 3)  # SpellingBee is not part of it
    capped = {n: dict(r, max_problems=100) for n, r in full.items()}
    assert chatcore(capped, capped=True)[:2] == ("ChatCORE (partial: at most 100 problems per task)",
                                                 "chatcore_partial_max100")
    sft_like = {n: dict(r, max_problems=24 if n in ("GSM8K", "HumanEval") else None) for n, r in full.items()}
    assert chatcore(sft_like, capped=True)[:2] == ("ChatCORE (partial: at most 24 problems of GSM8K, HumanEval)",
                                                   "chatcore_partial_max24on2")
    assert chatcore({"SpellingBee": {"accuracy": 1.0}}, capped=False) is None


def run_stage(capsys, *argv):
    stage.main(list(argv))
    return capsys.readouterr().out


def test_stage_table_json_and_partial_name(eval_home, capsys):
    out = run_stage(capsys, "-i", "base", "-x", "4", "-m", "6", "-b", "3", "--device-type", "cpu")
    results = eval_home / "chat_eval" / "base_d2"
    record = json.loads((results / "step_000040_max4.json").read_text())
    assert list(record["tasks"]) == list(chat_eval.TASKS)
    assert record["metric_name"] == "ChatCORE (partial: at most 4 problems per task)" and record["chatcore"] is None
    for r in record["tasks"].values():
        assert r["total"] == min(4, r["task_size"]) and 0 <= r["correct"] <= r["total"]
        assert r["accuracy"] == r["correct"] / r["total"]
    assert "HumanEval" in out and "ChatCORE (partial: at most 4 problems per task)" in out
    expected = sum(centered(record["tasks"][n]["accuracy"], chat_eval.TASKS[n].baseline)
                   for n in CHATCORE_TASKS) / len(CHATCORE_TASKS)
    assert record["metric"] == pytest.approx(expected)

    # two tasks in full: partial by tasks only, in a file of its own (the capped run's stays)
    run_stage(capsys, "-a", "ARC-Challenge|SpellingBee", "-m", "4", "--device-type", "cpu")
    record = json.loads((results / "step_000040_ARC-Challenge-SpellingBee.json").read_text())
    assert (results / "step_000040_max4.json").exists() and not (results / "step_000040.json").exists()
    assert list(record["tasks"]) == ["ARC-Challenge", "SpellingBee"]
    assert record["metric_key"] == "chatcore_partial_1of5" and record["tasks"]["ARC-Challenge"]["total"] == 7


def test_stage_errors(eval_home, tmp_path, monkeypatch):
    with pytest.raises(PicochatError, match="unknown task GSM9K"):
        stage.run(stage.ChatEvalConfig(task_name="GSM9K", device_type="cpu"))
    with pytest.raises(PicochatError, match="-x/--max-problems must be at least 1"):
        stage.run(stage.ChatEvalConfig(max_problems=0, device_type="cpu"))
    with pytest.raises(PicochatError, match="no model checkpoints"):
        monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
        stage.run(stage.ChatEvalConfig(device_type="cpu"))
    # one line on the command line, no traceback
    done = subprocess.run([sys.executable, "-m", "picochat", "chat-eval", "-a", "Nope"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "unknown task Nope" in done.stderr


def test_two_ranks_split_the_problems_and_sum_the_counts(eval_home, capsys):
    """Under torchrun (2 CPU processes, gloo) each rank takes whole batches in turn; the summed
    counts are the single process's."""
    args = ["-i", "base", "-a", "ARC-Easy|MMLU|GSM8K", "-x", "7", "-m", "5", "-b", "2", "--device-type", "cpu"]
    run_stage(capsys, *args)
    path = eval_home / "chat_eval" / "base_d2" / "step_000040_ARC-Easy-MMLU-GSM8K_max7.json"
    single = json.loads(path.read_text())
    path.unlink()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    done = subprocess.run([*torchrun, "-m", "picochat", "chat-eval", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads(path.read_text())
    for name in ("ARC-Easy", "MMLU", "GSM8K"):
        assert double["tasks"][name]["total"] == single["tasks"][name]["total"] == (6 if name == "GSM8K" else 7)
        assert double["tasks"][name]["correct"] == single["tasks"][name]["correct"]
    assert single["tasks"]["ARC-Easy"]["correct"] + single["tasks"]["MMLU"]["correct"] > 0  # counts to compare
    assert done.stdout.count("results written to") == 1  # rank 0 alone writes and prints


def test_an_exported_folder_scores_as_its_checkpoint(eval_home, tmp_path, capsys):
    from picochat.stages import export

    folder = export.run(export.ExportConfig(source="base", model_tag="d2", output=str(tmp_path / "shared"),
                                            dtype="fp32"))
    args = ["-a", "ARC-Easy|GSM8K", "-x", "3", "-m", "6", "--device-type", "cpu"]
    run_stage(capsys, "-i", "base", *args)
    run_stage(capsys, "-i", "hf", "--path", str(folder), *args)
    name = "step_000040_ARC-Easy-GSM8K_max3.json"
    ours = json.loads((eval_home / "chat_eval" / "base_d2" / name).read_text())
    theirs = json.loads((eval_home / "chat_eval" / "hf_shared" / name).read_text())
    assert theirs["source"] == "hf" and theirs["model_tag"] == "shared"
    for task in ("ARC-Easy", "GSM8K"):
        assert theirs["tasks"][task]["correct"] == ours["tasks"][task]["correct"]
        assert theirs["tasks"][task]["samples"] == ours["tasks"][task]["samples"]
