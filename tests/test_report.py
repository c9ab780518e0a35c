"""picochat report on a fixed, hand-written set of stage outputs: the tables it must produce (values
worked out by hand), stages that did not run reported as not run, plots written (or, without
matplotlib, the reason why not), and the stage's files."""

import datetime
import json
import os
import sys

import pytest

from picochat.common import PicochatError
from picochat.report import build_report
from picochat.stages import report as report_stage

MODEL = {"sequence_len": 64, "vocab_size": 1024, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 128,
         "window_pattern": "L", "preset": "default"}
NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.timezone.utc)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def checkpoint(home, stage, tag, step, meta, metrics):
    folder = home / f"{stage}_checkpoints" / tag
    write_json(folder / f"meta_{step:06d}.json", {"step": step, "model_config": MODEL, **meta})
    (folder / f"model_{step:06d}.pt").write_bytes(b"weights")  # only its presence is read
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"step": 3, "lo')


@pytest.fixture
def home(tmp_path, small_tokenizer, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    small_tokenizer.save(home / "tokenizer")
    (home / "tok_eval").mkdir()
    (home / "tok_eval" / "tok_eval.md").write_text("bytes per token table\n| news | 4.50 |\n")
    # base: 20 steps of 100 s on 8 processes, MFU 40/50 alternating, evals at 0, 10, 20
    train = [{"step": s, "loss": 5.0 - 0.1 * s, "dt": 100.0, "tok_per_s": 1000.0, "bf16_mfu": 40.0 + 10 * (s % 2),
              "tokens": 1000 * (s + 1), "flops": 1e9 * (s + 1)} for s in range(20)]
    evals = [{"step": s, "val_bpb": 1.5 - 0.01 * s} for s in (0, 10, 20)]
    loop = {"total_training_time": 1800.0, "val_bpb": 1.3, "min_val_bpb": 1.3}
    checkpoint(home, "base", "d2", 20, {"world_size": 8, "user_config": {"fp8": True}, "loop_state": loop},
               train + evals)
    write_json(home / "base_eval" / "d2" / "base_model_000020.json", {
        "core": {"tasks": {"hellaswag": {"accuracy": 0.5, "centered": 1 / 3, "examples": 100},
                           "arc_easy": {"accuracy": 0.4, "centered": 0.2, "examples": 50}},
                 "metric_name": "CORE (partial: 2 of 22 tasks)", "metric": 0.2667, "examples": 150},
        "bpb": {"train": 1.31, "val": 1.32, "split_tokens": 8192},
        "samples": {"conditioned": ["The capital of France is Paris."], "unconditioned": []}})
    sft_train = [{"step": s, "loss": 2.0 - 0.5 * s, "dt": 10.0} for s in range(5)]
    checkpoint(home, "sft", "d2", 5, {"world_size": 8, "base_checkpoint": {"tag": "d2", "step": 20},
                                      "loop_state": {"val_bpb": 0.9, "min_val_bpb": 0.9}},
               sft_train + [{"step": 5, "val_bpb": 0.9}])
    tasks = lambda arc, gsm: {"ARC-Easy": {"accuracy": arc}, "GSM8K": {"accuracy": gsm, "samples": [
        {"question": "What is  2+2?", "answer": "4\n#### 4", "correct": True}]}}
    write_json(home / "chat_eval" / "sft_d2" / "step_000005.json",
               {"step": 5, "tasks": tasks(0.3, 0.05), "metric_name": "ChatCORE (partial: 2 of 5 tasks)",
                "metric": 0.1})
    # a capped run of the same step: the full one's numbers are reported, and a task only it has
    write_json(home / "chat_eval" / "sft_d2" / "step_000005_ARC-Easy-MMLU_max5.json",
               {"step": 5, "tasks": {"ARC-Easy": {"accuracy": 1.0}, "MMLU": {"accuracy": 0.2}}})
    # results older than the checkpoint: an earlier run of the tag, since overwritten
    stale = home / "chat_eval" / "sft_d2" / "step_000005_HumanEval.json"
    write_json(stale, {"step": 5, "tasks": {"HumanEval": {"accuracy": 0.9}}})
    os.utime(stale, (0, 0))
    write_json(home / "chat_eval" / "base_d2" / "step_000020.json", {"step": 20, "tasks": tasks(0.25, 0.0)})
    return home


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_tables_from_fixed_stage_outputs(home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    text = build_report(home, out, now=NOW)
    assert text.startswith("# picochat run report\n\nGenerated 2026-12-03 12:00 UTC")
    assert "| picochat commit |" in section(text, "Environment") and "| torch |" in text

    tok = section(text, "Tokenizer")
    assert "vocabulary: 1,024 tokens" in tok and "| news | 4.50 |" in tok

    base = section(text, "base-train")
    # wte and lm_head: vocab x width = 1024 x 128
    assert "tag `d2`, step 20" in base and "wte 131,072" in base and "lm_head 131,072" in base
    assert "| processes | 8 |" in base
    assert "| matmul precision | fp8 (--fp8), evaluations in the compute dtype |" in base
    assert "| time in steps (sum of dt) | 2,000.0 s (0.56 h) |" in base  # 20 x 100 s
    assert "| training time (leaderboard clock: the steps after step 10) | 1,800.0 s (0.50 h) |" in base
    assert "| tokens trained | 20,000 |" in base and "| training FLOPs | 2.000e+10 |" in base
    assert "| mean bf16 MFU | 45.00% |" in base
    assert "| cost estimate (that clock) | $12.00 (8 GPU(s) at $3/GPU-hour, the reference's H100 price) |" in base
    assert "| val bpb (last) | 1.3000 |" in base
    assert "| hellaswag | 0.5000 | 0.3333 | 100 |" in base and "| arc_easy | 0.4000 | 0.2000 | 50 |" in base
    assert "| **CORE (partial: 2 of 22 tasks)** |  | **0.2667** | 150 |" in base  # its partial name kept
    assert "bits per byte: train 1.3100, val 1.3200 (8,192 tokens per split)" in base

    sft = section(text, "chat-sft")
    assert "from base `d2` step 20" in sft and "| time in steps (sum of dt) | 50.0 s (0.01 h) |" in sft
    assert "cost estimate" not in sft and "| val bpb (last) | 0.9000 |" in sft
    assert section(text, "chat-rl").strip() == "chat-rl not run (no checkpoint)."

    chat = section(text, "Chat evaluation (chat-eval)")
    assert "| task | base (step 20) | sft (step 5) | rl (not run) |" in chat
    assert "| ARC-Easy | 0.2500 | 0.3000 | not run |" in chat and "| GSM8K | 0.0000 | 0.0500 | not run |" in chat
    assert "| MMLU | not run | 0.2000 | not run |" in chat and "HumanEval" not in chat
    assert "| ChatCORE (name as reported) | n/a | ChatCORE (partial: 2 of 5 tasks): 0.1000 | n/a |" in chat

    samples = section(text, "Samples")
    assert "The capital of France is Paris." in samples
    assert "sft model, chat-eval answers:\n\n- GSM8K (right): 'What is 2+2?' → '4 #### 4'" in samples
    plots = section(text, "Plots")
    names = ["base_loss.png", "base_val_bpb.png", "base_speed.png", "sft.png"]
    assert all(f"]({name})" in plots for name in names) and "rl.png" not in plots
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in names)


def test_the_plotted_points(home):
    """An eval at step s and the loss of step s sit at the totals of step s - 1 (0 at s = 0); the
    eval line logged after the checkpoint's step (a killed run's) is left out."""
    from picochat.report import find_run, plot_specs

    metrics = home / "base_checkpoints" / "d2" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '\n{"step": 30, "val_bpb": 9.9}\n')
    specs = {name: panels for name, _, panels in plot_specs({"base": find_run("base")})}
    (_, _, [(_, steps, bpb)]), (_, _, [(_, tokens, _)]), (_, _, [(_, flops, _)]) = specs["base_val_bpb.png"]
    assert steps == [0, 10, 20] and tokens == [0, 10_000, 20_000] and flops == [0, 1e10, 2e10]
    assert bpb == pytest.approx([1.5, 1.4, 1.3])
    (_, _, [(_, steps, _)]), (_, _, [(_, tokens, loss)]), _ = specs["base_loss.png"]
    assert steps == list(range(20)) and tokens == [1000 * s for s in range(20)] and loss[1] == pytest.approx(4.9)


def test_damaged_inputs_do_not_stop_the_report(home, tmp_path):
    (home / "base_checkpoints" / "d2" / "metrics.jsonl").write_text('[1, 2]\n"text"\n{"no step": 1}\n')
    (home / "tokenizer" / "tokenizer.pkl").unlink()
    text = build_report(home, tmp_path, now=NOW)
    assert "| time in steps (sum of dt) | n/a (no metrics) |" in text and "cannot be read" in text


def test_nothing_run_and_no_matplotlib(tmp_path, monkeypatch):
    home = tmp_path / "empty"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives
    text = build_report(home, tmp_path, now=NOW)
    for line in ("tok-train not run (no tokenizer).", "base-train not run (no checkpoint).",
                 "chat-sft not run (no checkpoint).", "chat-rl not run (no checkpoint).", "chat-eval not run.",
                 "matplotlib is not installed (pip install 'picochat[report]'), so this report has no plots."):
        assert line in text
    assert not list(tmp_path.glob("*.png"))


def test_the_stage_writes_the_report_and_a_copy(home, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "here"
    report_stage.main(["--copy-to", str(copy)])
    written = home / "report" / "report.md"
    assert written.exists() and (home / "report" / "base_loss.png").exists()
    text = (copy / "report.md").read_text()
    # the copy links the plots where they are: none are copied among the user's files
    assert f"]({(home / 'report' / 'base_loss.png').resolve()})" in text and not list(copy.glob("*.png"))
    assert "report written to" in capsys.readouterr().out
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "typo"))
    with pytest.raises(PicochatError, match="does not exist"):
        report_stage.run(report_stage.ReportConfig(copy_to=""))
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("core, verdict", [
    (None, "; CORE (partial: 2 of 22 tasks): 0.2667, not the full CORE: no verdict."),
    (0.2566, "; CORE 0.2566, which beats GPT-2's 0.256525."),
    (0.2565, "; CORE 0.2565, which does not beat GPT-2's 0.256525."),
    ("no eval", "; base-eval (CORE) not run: no verdict."),
])
def test_the_leaderboard_verdict(home, core, verdict):
    from picochat.report import find_run, leaderboard

    path = home / "base_eval" / "d2" / "base_model_000020.json"
    if core == "no eval":
        path.unlink()
    elif core is not None:
        result = json.loads(path.read_text())
        result["core"].update(core=core, metric=core, metric_name="CORE")
        path.write_text(json.dumps(result))
    line = leaderboard(home, find_run("base"))
    assert line == "leaderboard time (base-train's steps after step 10): 1,800.0 s (0.50 h)" + verdict
    assert leaderboard(home, None) == "leaderboard: no base-train run."


def test_the_price_is_a_flag(home, tmp_path, capsys):
    report_stage.main(["--copy-to", "", "--gpu-hour-usd", "2.5"])
    text = (home / "report" / "report.md").read_text()
    assert "| cost estimate (that clock) | $10.00 (8 GPU(s) at $2.5/GPU-hour, as given) |" in text  # 0.5 h x 8 x 2.5
    assert "no verdict" in capsys.readouterr().out.splitlines()[-1]
    with pytest.raises(PicochatError, match="gpu-hour-usd"):
        report_stage.main(["--copy-to", "", "--gpu-hour-usd", "-1"])
