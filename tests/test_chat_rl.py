"""chat-rl on the tiny base checkpoint: a toy task's reward rises, exact resume after SIGTERM,
two gloo processes make the same update as one, the real GSM8K task through a mirror (with the
calculator tool), and the errors a user meets."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from chat_data import GSM8K_SCHEMA, gsm8k_rows, write_split, write_words
from conftest import REPO, free_port

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.stages import chat_rl
from picochat.stages.chat_rl import RLConfig, run

TOY = "rl_toy:FirstWord"


@pytest.fixture
def home(base_home, tmp_path, monkeypatch):
    home = shutil.copytree(base_home, tmp_path / "home")
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")  # exact resume is promised in fp32
    return home


def config(**overrides) -> RLConfig:
    base = dict(source="base", task=TOY, device_type="cpu", num_iterations=6, examples_per_step=4, num_samples=8,
                device_batch_size=8, max_new_tokens=3, eval_every=-1, eval_examples=8, eval_samples=4,
                save_every=-1, init_lr_frac=0.1)
    return RLConfig(**(base | overrides))


def metrics(home, tag="d2") -> list[dict]:
    return [json.loads(line) for line in (home / "rl_checkpoints" / tag / "metrics.jsonl").read_text().splitlines()]


def deterministic(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("dt", "rollout_s", "rollout_tok_per_s")} for r in records]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_the_reward_rises_on_a_toy_task(home):
    """Reward 1 for answers starting with rl_toy.TARGET: from a few percent to most samples within 30 steps
    (fixed seeds), and pass@1 on the test prompts rises with it."""
    result = run(config(num_iterations=30, eval_every=30))
    records = metrics(home)
    rewards = [r["reward"] for r in records if "reward" in r]
    assert len(rewards) == 30 and result["step"] == 30
    assert sum(rewards[:3]) / 3 < 0.15 and sum(rewards[-5:]) / 5 > 0.5, rewards
    evals = [r for r in records if "pass@1" in r]
    assert [r["step"] for r in evals] == [0, 30] and evals[-1]["pass@1"] > evals[0]["pass@1"] + 0.2
    assert all(r["eval_problems"] == 8 and r["pass@1"] <= r["pass@2"] <= r["pass@3"] <= r["pass@4"] for r in evals)
    step = [r for r in records if "reward" in r][0]
    assert step["samples"] == 32 and 1 <= step["seq_len"] <= 3 and step["lrm"] == 1.0
    assert [r["lrm"] for r in records if "lrm" in r][-1] == pytest.approx(1 - 29 / 30)
    folder = home / "rl_checkpoints" / "d2"
    assert ckpt.complete_steps(folder) == [30] and ckpt.optim_path(folder, 30, 0).exists()
    meta = ckpt.load_meta(folder, 30)
    assert meta["source_checkpoint"] == {"stage": "base", "tag": "d2", "step": 40} and meta["num_steps"] == 30


def test_resume_after_sigterm_is_exact(base_home, tmp_path, monkeypatch):
    """A straight run, and one stopped by SIGTERM at step 3 then resumed in another home: the same
    rewards, objectives and pass@k, bit for bit, and the same weights."""
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")
    c = config(num_iterations=6, save_every=3, eval_every=3)
    straight_home = shutil.copytree(base_home, tmp_path / "straight")
    monkeypatch.setenv("PICOCHAT_HOME", str(straight_home))
    run(c)
    straight = metrics(straight_home)
    assert [r["step"] for r in straight if "pass@1" in r] == [0, 3, 6]

    killed_home = shutil.copytree(base_home, tmp_path / "killed")
    monkeypatch.setenv("PICOCHAT_HOME", str(killed_home))
    stop_requested, calls = chat_rl.stop_requested, []

    def sigterm_at_step_3(stop, device, ddp):
        calls.append(1)
        if len(calls) == 4:  # checked once at the top of each step: 0, 1, 2, 3
            signal.raise_signal(signal.SIGTERM)
        return stop_requested(stop, device, ddp)

    monkeypatch.setattr(chat_rl, "stop_requested", sigterm_at_step_3)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        run(c)
    monkeypatch.setattr(chat_rl, "stop_requested", stop_requested)
    folder = killed_home / "rl_checkpoints" / "d2"
    assert ckpt.complete_steps(folder) == [3]
    with pytest.raises(PicochatError, match=r"trained with other settings \(--max-new-tokens 3 -> 4\)"):
        run(config(num_iterations=6, save_every=3, eval_every=3, max_new_tokens=4, resume=True))
    run(config(num_iterations=6, save_every=3, eval_every=3, resume=True))
    resumed = metrics(killed_home)
    assert deterministic(resumed) == deterministic(straight)
    a = ckpt.load_model_state(straight_home / "rl_checkpoints" / "d2", 6, "cpu")
    b = ckpt.load_model_state(folder, 6, "cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_from_a_periodic_checkpoint(base_home, tmp_path, monkeypatch):
    """A run that dies at step 5 (no save then) resumes from its step-3 checkpoint, whose evals ran
    before the save: metrics.jsonl ends up as the straight run's, each step once."""
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")
    c = config(num_iterations=6, save_every=3, eval_every=3)
    straight_home = shutil.copytree(base_home, tmp_path / "straight")
    monkeypatch.setenv("PICOCHAT_HOME", str(straight_home))
    run(c)
    crashed_home = shutil.copytree(base_home, tmp_path / "crashed")
    monkeypatch.setenv("PICOCHAT_HOME", str(crashed_home))
    train_step = chat_rl.train_step

    def dies_at_step_5(r, step):
        if step == 5:
            raise RuntimeError("the machine went away")
        return train_step(r, step)

    monkeypatch.setattr(chat_rl, "train_step", dies_at_step_5)
    with pytest.raises(RuntimeError, match="went away"):
        run(c)
    monkeypatch.setattr(chat_rl, "train_step", train_step)
    assert ckpt.complete_steps(crashed_home / "rl_checkpoints" / "d2") == [3]
    assert [r["step"] for r in metrics(crashed_home) if "reward" in r] == [0, 1, 2, 3, 4]
    run(config(num_iterations=6, save_every=3, eval_every=3, resume=True))
    assert deterministic(metrics(crashed_home)) == deterministic(metrics(straight_home))


def test_two_processes_make_the_same_update_as_one(home):
    """Rollout seeds depend on (step, example, batch), not on the rank, so two gloo processes taking
    two examples each draw the samples one process draws for all four; after two steps the
    weights agree (up to the all-reduce's float rounding) and so do the logged rewards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RL_TOY_TARGET": " the"}  # the likelier word: rewards to learn from
    args = ["chat-rl", "-i", "base", "--task", TOY, "--device-type", "cpu", "--num-iterations", "2",
            "--examples-per-step", "4", "--num-samples", "8", "--device-batch-size", "4", "--max-new-tokens", "3",
            "--eval-every", "-1", "--init-lr-frac", "0.1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    for tag, launcher in (("one", [sys.executable]), ("two", torchrun)):
        done = subprocess.run([*launcher, "-m", "picochat", *args, "--output-tag", tag], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (metrics(home, tag) for tag in ("one", "two"))
    assert [r["reward"] for r in one] == [r["reward"] for r in two]
    assert [r["samples"] for r in two] == [32, 32] and any(r["reward"] > 0 for r in two)
    a = ckpt.load_model_state(home / "rl_checkpoints" / "one", 2, "cpu")
    b = ckpt.load_model_state(home / "rl_checkpoints" / "two", 2, "cpu")
    start = ckpt.load_model_state(home / "base_checkpoints" / "d2", 40, "cpu")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the steps did change the model
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gsm8k_and_spelling_through_a_mirror(home, tmp_path, monkeypatch):
    """The default task: GSM8K train/test from the task mirror, rewards from the "#### N" answer,
    samples through the engine with the calculator tool; then --task spelling."""
    mirror = tmp_path / "mirror"
    write_split(mirror, "openai/gsm8k", "main", "train", gsm8k_rows(8), GSM8K_SCHEMA)
    write_split(mirror, "openai/gsm8k", "main", "test", gsm8k_rows(4), GSM8K_SCHEMA)
    monkeypatch.setenv("PICOCHAT_TASK_DATA_URL", str(mirror))
    result = run(config(task="gsm8k", num_iterations=-1, examples_per_step=4, num_samples=2, device_batch_size=2,
                        max_new_tokens=8, eval_every=2, eval_examples=-1, eval_samples=2))
    assert result["step"] == 2  # 8 examples // 4 per step, one epoch
    records = metrics(home)
    assert [r["step"] for r in records if "reward" in r] == [0, 1]
    assert all(0 <= r["reward"] <= 1 for r in records if "reward" in r)
    assert [r["eval_problems"] for r in records if "pass@1" in r] == [4, 4]

    # --task spelling: SpellingBee over the mirror's word list, the same loop
    write_words(mirror, ["apple", "banana", "cherry", "strawberry"])
    result = run(config(task="spelling", num_iterations=1, num_samples=2, device_batch_size=2, max_new_tokens=8,
                        eval_every=1, eval_examples=2, eval_samples=2, output_tag="spelling"))
    records = metrics(home, "spelling")
    assert [r["step"] for r in records if "reward" in r] == [0]
    assert [r["eval_problems"] for r in records if "pass@1" in r] == [2, 2]


@pytest.mark.parametrize("overrides, says", [
    ({"task": "nosuchmodule:Task"}, "cannot import"),
    ({"task": "gsm9k"}, "gsm8k, spelling, or module:Class"),
    ({"task": "rl_toy:TARGET"}, "not a picochat.tasks.common.Task"),
    ({"examples_per_step": 64}, "fewer than --examples-per-step 64"),
    ({"source": "sft"}, "sft"),
    ({"task": "picochat.tasks.humaneval:HumanEval"}, "HumanEval(split='train')"),
    ({"num_samples": 6, "device_batch_size": 4}, "multiple of --device-batch-size 4"),
    ({"eval_examples": 0}, "--eval-examples"),
])
def test_bad_settings_are_one_line_errors(home, overrides, says):
    with pytest.raises(PicochatError) as e:
        run(config(**overrides))
    assert says in one_line(e)


def test_tags_with_checkpoints_are_kept(home):
    run(config(num_iterations=1))
    with pytest.raises(PicochatError) as e:
        run(config(num_iterations=1))
    assert "--resume" in one_line(e) and "--overwrite" in one_line(e)
    run(config(num_iterations=1, overwrite=True))
    # from an RL checkpoint, into the same tag: its own source would be overwritten
    with pytest.raises(PicochatError) as e:
        run(config(source="rl", num_iterations=1, overwrite=True))
    assert "--output-tag" in one_line(e)
    assert ckpt.complete_steps(home / "rl_checkpoints" / "d2") == [1]
    run(config(source="rl", num_iterations=1, output_tag="again"))


def test_command_line():
    out = subprocess.run([sys.executable, "-m", "picochat", "chat-rl", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0
    for flag in ("--task", "--examples-per-step", "--num-samples", "--eval-samples", "--resume", "--init-lr-frac"):
        assert flag in out.stdout
    out = subprocess.run([sys.executable, "-m", "picochat", "chat-rl", "--num-samples", "0"], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PICOCHAT_HOME": "/nonexistent/picochat"})
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "--num-samples" in out.stderr
