"""chat-sft on the tiny base model (conftest.base_home) and a small task mirror in the real Hub
schemas (tests/chat_data.py): SFT learns the chat format (val bpb falls), inherits the base run's
sizes and lrs, saves a loadable sft checkpoint, resumes after SIGTERM bit for bit, never deletes a
tag's checkpoints unasked, makes the same run in two gloo processes as in one, mixes in
--identity / --extra-jsonl, logs a (partial) ChatCORE, and gives one-line errors. The all-masked
micro-batch is tests/test_training.py's."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from chat_data import GSM8K_TRAIN, MMLU_AUX, SMOLTALK_TRAIN, SPELLING, write_task_mirror
from conftest import REPO, free_port

from picochat import checkpoint as ckpt
from picochat import cli
from picochat.common import PicochatError
from picochat.stages import chat_sft
from picochat.stages.chat_sft import SFTConfig, lr_multiplier, run


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Every split chat-sft reads: the training mixture, validation, and ChatCORE's five tasks."""
    return write_task_mirror(tmp_path_factory.mktemp("task_mirror"))


def make_home(base_home, folder, mirror, monkeypatch):
    """A writable copy of the base home (the fixture's own must stay as it is), with the mirror."""
    home = shutil.copytree(base_home, folder)
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.setenv("PICOCHAT_TASK_DATA_URL", str(mirror))
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")  # exact resume is promised in fp32
    return home


@pytest.fixture
def home(base_home, mirror, tmp_path, monkeypatch):
    return make_home(base_home, tmp_path / "home", mirror, monkeypatch)


def config(**overrides) -> SFTConfig:
    base = dict(device_type="cpu", compile="off", num_iterations=6, device_batch_size=2, total_batch_size=256,
                eval_every=-1, eval_tokens=512, chatcore_every=-1, mmlu_epochs=1, gsm8k_epochs=1,
                spelling_bee=SPELLING, simple_spelling=SPELLING)
    return SFTConfig(**(base | overrides))


def metrics(home, tag="d2") -> list[dict]:
    return [json.loads(line) for line in (home / "sft_checkpoints" / tag / "metrics.jsonl").read_text().splitlines()]


def deterministic(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("dt", "tok_per_s", "bf16_mfu")} for r in records]


def mixture_size(extra: int = 0) -> int:
    return SMOLTALK_TRAIN + MMLU_AUX + GSM8K_TRAIN + 2 * SPELLING + extra


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------
# Training


def test_sft_learns_inherits_and_saves_a_chat_checkpoint(home):
    """Sizes and lrs left unset come from the base run (T 64, 4 rows, 512-token batch, its lr
    flags); 12 steps teach the chat format: the SFT val bpb falls by far."""
    n = 12
    result = run(config(num_iterations=n, device_batch_size=None, total_batch_size=None, eval_every=6))
    assert result["step"] == n
    folder = home / "sft_checkpoints" / "d2"
    assert ckpt.complete_steps(folder) == [n]
    meta = ckpt.load_meta(folder, n)
    c = meta["user_config"]
    assert (c["max_seq_len"], c["device_batch_size"], c["total_batch_size"]) == (64, 4, 512)
    assert (c["embedding_lr"], c["unembedding_lr"], c["matrix_lr"]) == (3.0, 0.08, 0.2)  # base_home's flags
    assert meta["base_checkpoint"] == {"tag": "d2", "step": 40}
    assert meta["dataloader_state"]["dataset_size"] == mixture_size()

    records = metrics(home)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in train] == list(range(n))
    assert [r["step"] for r in evals] == [0, 6, n]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 1.0
    assert result["val_bpb"] == evals[-1]["val_bpb"] == meta["val_bpb"]
    assert result["min_val_bpb"] == min(r["val_bpb"] for r in evals)
    for r in train:
        assert set(r) == {"step", "loss", "lrm", "progress", "dt", "tok_per_s", "bf16_mfu", "tokens"}
        assert math.isfinite(r["loss"]) and r["bf16_mfu"] is None  # CPU: no known peak
        assert r["progress"] == r["step"] / n and r["lrm"] == lr_multiplier(r["step"] / n, 0.0, 0.5, 0.0)
        assert r["tokens"] == 512 * (r["step"] + 1) and r["tok_per_s"] == pytest.approx(512 / r["dt"])

    model, tokenizer, loaded_meta = ckpt.load_model("sft", "cpu", torch.float32, "d2")
    assert loaded_meta["step"] == n and not model.training
    saved = ckpt.load_model_state(folder, n, "cpu")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # a usable model: finite logits over the vocabulary
        ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hello 3"},
                                                            {"role": "assistant", "content": ""}]})
        assert torch.isfinite(model(torch.tensor([ids]))).all()


def test_one_epoch_without_num_iterations(home):
    """--num-iterations -1: the lr follows the mixture's progress, and the run stops after one epoch."""
    result = run(config(num_iterations=-1, warmdown_ratio=0.3))
    train = [r for r in metrics(home) if "loss" in r]
    assert result["step"] == len(train) >= 1
    progress = [r["progress"] for r in train]
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] < 1.0
    # the last step trained the batch that completed the epoch: every conversation of it
    state = ckpt.load_meta(home / "sft_checkpoints" / "d2", result["step"])["dataloader_state"]
    assert state["packed_before"] >= state["dataset_size"] > state["packed_before"] - 4 * 4
    assert state["epoch"] == 2
    for r in train:
        assert r["lrm"] == lr_multiplier(r["progress"], 0.0, 0.3, 0.0)


def test_load_optimizer_brings_the_base_momentum(home):
    """The same weights give the same first loss; the base run's momentum buffers change the first
    update, so the second loss differs."""
    run(config(num_iterations=2, output_tag="with"))
    run(config(num_iterations=2, output_tag="without", load_optimizer=False))
    with_, without = ([r["loss"] for r in metrics(home, tag) if "loss" in r] for tag in ("with", "without"))
    assert with_[0] == without[0] and with_[1] != without[1]


def test_resume_after_sigterm_is_exact(base_home, mirror, tmp_path, monkeypatch):
    """A straight run, and one stopped by SIGTERM at step 3 (a checkpoint is saved, its evals not yet
    run) then resumed in another home: the same losses and val bpb, bit for bit, and the same weights."""
    n = 6
    straight_home = make_home(base_home, tmp_path / "straight", mirror, monkeypatch)
    run(config(num_iterations=n, save_every=3, eval_every=3))
    straight = metrics(straight_home)
    assert [r["step"] for r in straight if "val_bpb" in r] == [0, 3, 6]

    killed_home = make_home(base_home, tmp_path / "killed", mirror, monkeypatch)
    stop_requested, calls = chat_sft.stop_requested, []

    def sigterm_at_step_3(stop, device, ddp):
        calls.append(1)
        if len(calls) == 4:  # checked once at the top of each step: 0, 1, 2, 3
            signal.raise_signal(signal.SIGTERM)
        return stop_requested(stop, device, ddp)

    monkeypatch.setattr(chat_sft, "stop_requested", sigterm_at_step_3)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        run(config(num_iterations=n, save_every=3, eval_every=3))
    monkeypatch.setattr(chat_sft, "stop_requested", stop_requested)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    folder = killed_home / "sft_checkpoints" / "d2"
    assert ckpt.complete_steps(folder) == [3]
    assert not ckpt.load_meta(folder, 3)["loop_state"]["evals_done"]
    assert deterministic(metrics(killed_home)) == deterministic([r for r in straight if r["step"] < 3])

    # another lr is another run: refused, with the flag named
    with pytest.raises(PicochatError, match=r"trained with other settings \(--matrix-lr 0\.2 -> 0\.1\)"):
        run(config(num_iterations=n, save_every=3, eval_every=3, resume=True, matrix_lr=0.1))
    result = run(config(num_iterations=n, save_every=3, eval_every=3, resume=True))
    assert result["step"] == n
    resumed = metrics(killed_home)
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    assert deterministic(resumed) == deterministic(straight)
    a = ckpt.load_model_state(straight_home / "sft_checkpoints" / "d2", n, "cpu")
    b = ckpt.load_model_state(folder, n, "cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_make_the_same_run_as_one(home):
    """One epoch at T=12: every conversation of the mixture renders to 14+ tokens, so each row holds
    one (cut to 13) and the buffer hands them out in arrival order. Then one process taking 4 rows
    a step (2 micro-batches) and two gloo processes taking 2 each (every other conversation) train
    on the same conversations at every step, with different unmasked-token counts per rank (MMLU
    and GSM8K rows are all prompt at this length): the epoch ends at the same step, the val bpb
    (over the same 8 conversations) and the final weights agree up to the all-reduce's rounding,
    which the 30 steps amplify to 1e-4 of the change.
    Both start with a fresh optimizer: the base run's state is per rank, so only a run with its
    process count can take it. backout_lambda is left out: at depth 2 it scales the last block's
    output, which the final norm undoes, so its gradient is rounding noise that Adam blows up to
    full steps, differently in each run (and without effect on the logits)."""
    args = ["chat-sft", "--device-type", "cpu", "--compile", "off", "--num-iterations", "-1", "--max-seq-len", "12",
            "--device-batch-size", "2", "--total-batch-size", "48", "--eval-every", "10", "--eval-tokens", "96",
            "--chatcore-every", "-1", "--load-optimizer", "0", "--init-lr-frac", "0.1", "--mmlu-epochs", "1",
            "--gsm8k-epochs", "1", "--spelling-bee", str(SPELLING), "--simple-spelling", str(SPELLING)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for tag, launcher in (("one", [sys.executable]), ("two", torchrun)):
        done = subprocess.run([*launcher, "-m", "picochat", *args, "--output-tag", tag], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    steps = mixture_size() // 4
    one, two = (metrics(home, tag) for tag in ("one", "two"))
    assert [r["step"] for r in one if "loss" in r] == [r["step"] for r in two if "loss" in r] == list(range(steps))
    val_one, val_two = ([(r["step"], r["val_bpb"]) for r in m if "val_bpb" in r] for m in (one, two))
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [0, 10, 20, steps]
    for (_, a), (_, b) in zip(val_one, val_two):
        assert a == pytest.approx(b, rel=1e-4)
    assert val_one[-1][1] < val_one[0][1]  # it trained on something
    a = ckpt.load_model_state(home / "sft_checkpoints" / "one", steps, "cpu")
    b = ckpt.load_model_state(home / "sft_checkpoints" / "two", steps, "cpu")
    assert ckpt.load_meta(home / "sft_checkpoints" / "two", steps)["world_size"] == 2
    start = ckpt.load_model_state(home / "base_checkpoints" / "d2", 40, "cpu")
    for k in a.keys() - {"backout_lambda"}:  # the runs differ by 1e-4 of what they changed (Muon amplifies rounding)
        assert (a[k] - b[k]).norm() < 1e-3 * (a[k] - start[k]).norm(), k


def test_a_fresh_run_refuses_a_tag_with_checkpoints(home, capsys):
    run(config(num_iterations=2))
    folder = home / "sft_checkpoints" / "d2"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(PicochatError) as excinfo:
        run(config(num_iterations=2))
    assert "already has checkpoints (steps 2): pass --resume" in one_line(excinfo)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    capsys.readouterr()
    run(config(num_iterations=1, overwrite=True))
    assert "--overwrite: removed the 1 earlier checkpoint(s)" in capsys.readouterr().out
    assert ckpt.complete_steps(folder) == [1]
    assert [r["step"] for r in metrics(home)] == [0]  # the old run's lines are gone too


# ---------------------------------------------------------------------------
# Data of your own


def test_identity_and_extra_jsonl_are_mixed_in(home, tmp_path):
    identity, extra = tmp_path / "identity.jsonl", tmp_path / "extra.jsonl"
    identity.write_text(json.dumps([{"role": "user", "content": "who are you?"},
                                    {"role": "assistant", "content": "I am picochat."}]) + "\n")
    extra.write_text(json.dumps({"messages": [{"role": "system", "content": "Be kind."},
                                              {"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello!"}]}) + "\n\n"
                     + json.dumps([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]) + "\n")
    c = config(num_iterations=1, identity=str(identity), extra_jsonl=str(extra))
    run(c)
    meta = ckpt.load_meta(home / "sft_checkpoints" / "d2", 1)
    assert meta["dataloader_state"]["dataset_size"] == mixture_size(extra=2 * 1 + 2)  # identity twice
    mixture = chat_sft.train_mixture(c, chat_sft.own_conversations(c))
    users = [conversation["messages"][-2]["content"] for conversation in mixture]
    assert users.count("who are you?") == 2 and users.count("hi") == 1 and users.count("2+2?") == 1

    # a bad line: one line naming it, before --overwrite deletes anything
    extra.write_text(extra.read_text() + '{"messages": [oops\n')
    with pytest.raises(PicochatError) as excinfo:
        run(dataclasses.replace(c, overwrite=True))
    assert one_line(excinfo).startswith(f"{extra}:4: not valid JSON")
    assert ckpt.complete_steps(home / "sft_checkpoints" / "d2") == [1]
    with pytest.raises(PicochatError, match="no such conversations file"):
        run(dataclasses.replace(c, identity=str(tmp_path / "missing.jsonl"), overwrite=True))
    extra.write_text(json.dumps([{"role": "assistant", "content": "no question"}]) + "\n")
    with pytest.raises(PicochatError, match=r"extra\.jsonl:1: a conversation needs at least a user and an assistant"):
        run(dataclasses.replace(c, overwrite=True))


# ---------------------------------------------------------------------------
# ChatCORE during training


def test_chatcore_during_training_is_partial_when_capped(home):
    """Capped (4 categorical problems, 2 generative ones), ChatCORE is logged under its partial name
    at every --chatcore-every step and the last, never as "chatcore"."""
    run(config(num_iterations=3, chatcore_every=2, chatcore_max_cat=4, chatcore_max_sample=2))
    records = [r for r in metrics(home) if "loss" not in r]
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        # all five tasks, and the categorical three alone (the reference's ChatCORE_cat)
        assert set(r) - {"step"} == {"chatcore_partial_max2on2_max4on3", "chatcore_partial_3of5_max4"}
        assert all(-1.0 <= r[key] <= 1.0 for key in set(r) - {"step"})
    assert records[0].keys() == records[1].keys()
    assert not any("chatcore" in r for r in metrics(home))


def test_chatcore_data_is_fetched_before_training(home, mirror, tmp_path, monkeypatch):
    partial = shutil.copytree(mirror, tmp_path / "partial_mirror")
    shutil.rmtree(partial / "openai--openai_humaneval")
    monkeypatch.setenv("PICOCHAT_TASK_DATA_URL", str(partial))
    with pytest.raises(PicochatError) as excinfo:
        run(config(num_iterations=2, chatcore_every=1))
    assert "openai_humaneval" in one_line(excinfo)
    assert not ckpt.complete_steps(home / "sft_checkpoints" / "d2")
    run(config(num_iterations=1))  # without ChatCORE that data is not needed
    # --overwrite with data that cannot be had fails before it deletes the run it would replace
    with pytest.raises(PicochatError, match="openai_humaneval"):
        run(config(num_iterations=2, chatcore_every=1, overwrite=True))
    assert ckpt.complete_steps(home / "sft_checkpoints" / "d2") == [1]


# ---------------------------------------------------------------------------
# Errors and the command line


def test_errors(home, capsys):
    with pytest.raises(PicochatError, match="either --resume .* or --resume-from-step"):
        run(config(resume=True, resume_from_step=2))
    with pytest.raises(PicochatError, match="--overwrite starts over"):
        run(config(resume=True, overwrite=True))
    with pytest.raises(PicochatError, match="--mmlu-epochs must be at least 0"):
        run(config(mmlu_epochs=-1))
    with pytest.raises(PicochatError, match="valid --device-batch-size values: 1, 2, 4$"):
        run(config(device_batch_size=3))
    with pytest.raises(PicochatError, match="no complete checkpoint at step 4 .*saved: none"):
        run(config(resume_from_step=4))
    with pytest.raises(PicochatError, match="no complete checkpoint in .*base_checkpoints/d9"):
        run(config(model_tag="d9"))
    capsys.readouterr()  # the runs above fetched the task data first
    with pytest.raises(SystemExit) as exit_info:
        cli.run(chat_sft.main, ["--device-type", "cpu", "--resume", "--overwrite"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: --overwrite starts over and --resume continues: pass one of them"


def test_command_line_help_and_no_base_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_sft.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: picochat chat-sft ") and "--chatcore-max-sample" in text
    assert "--load-optimizer {0,1}" in text and "(if not given: the base run's, else 2048)" in " ".join(text.split())
    # the real entry point, in a home without a base model: one line, no traceback
    env = {"PATH": os.environ["PATH"], "PICOCHAT_HOME": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "picochat", "chat-sft", "--device-type", "cpu"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: no base checkpoints in ")
    assert len(out.stderr.strip().splitlines()) == 1
