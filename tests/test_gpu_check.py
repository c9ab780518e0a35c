"""bench/gpu_check.py, the prepared check for a lent GPU: its --smoke run takes every code path on
the CPU, and its two-rank step (NCCL on a GPU, never run by a 1-GPU machine) runs here with gloo."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from chat_data import write_task_mirror
from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"
SECTION_TITLES = ("1. training throughput", "2. attention fwd+bwd", "3. loss falls", "4. KV-cache decode",
                  "5. 2-GPU NCCL step", "6. SFT step",
                  "7. chat-web streams", "8. RL step")


def run_check(tmp_path, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PICOCHAT_HOME": str(tmp_path / "home")}
    env.pop("PICOCHAT_ATTENTION", None)
    results = tmp_path / "RESULTS.md"
    t0 = time.perf_counter()
    command = [sys.executable, "bench/gpu_check.py", "--smoke", "--results", str(results), *flags]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return results.read_text(), summary, wall


def rows(block: str) -> dict:
    """'section | item' -> result cell of the markdown table."""
    table = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block.splitlines()
             if line.startswith("| ")]
    return {f"{section} | {item}": result for section, item, result in table[1:]}


def test_smoke_run_records_every_section(tmp_path):
    block, summary, wall = run_check(tmp_path)
    # the target is < 60 s (measured 40-47 s with a cold inductor cache, ~11 s warm, on 2 shared
    # cores); the margin is for a loaded machine
    assert wall < 90, f"the smoke run took {wall:.0f} s"
    assert re.search(r"^## GPU check smoke run .*, \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$", block, re.M)
    assert "- device: cpu, compute dtype float32" in block
    assert re.search(r"^- torch: .+, CUDA ", block, re.M)
    assert re.search(r"^- commit: ([0-9a-f]{7,}(\+dirty)?|unknown.*)$", block, re.M)
    assert "- command: `python bench/gpu_check.py --smoke --results " in block
    table = rows(block)
    for title in SECTION_TITLES:
        assert any(key.startswith(title) for key in table), title
    assert table["1. training throughput | d2 fa3"] == "skipped: no CUDA"
    assert table["1. training throughput | d2 flex/sdpa"].startswith("ok: B=4: ")
    assert table["1. training throughput | d2 fp8"].startswith("ok: B=4: ")
    assert table["2. attention fwd+bwd | flex"].startswith("skipped: FlexAttention has no backward")
    assert table["2. attention fwd+bwd | sdpa"].startswith("ok: ")
    assert table["3. loss falls | d2"].startswith("pass: ")
    decode = table["4. KV-cache decode | d2"]
    assert decode.startswith("ok: d2: ctx 16: prefill ") and "B=2 " in decode and "step cost ctx 64 / 16" in decode
    assert table["5. 2-GPU NCCL step | 2 ranks"] == "skipped: 0 GPUs visible"
    assert table["6. SFT step | d2"].startswith("ok: d2 B=4 x 2 micro-batches: ")
    assert table["7. chat-web streams | d2"].startswith("ok: d2: 1 streams: TTFT median ")
    assert table["8. RL step | d2"].startswith("ok: d2 1 x 2 samples (batch 2, <= 4 tokens): step ")

    assert {"date", "device", "torch", "cuda", "commit", "command", "elapsed_s", "ok", "results"} <= set(summary)
    assert summary["ok"] and summary["smoke"]
    assert set(summary["results"]) == {"throughput", "attention", "loss", "kv_decode", "nccl", "sft", "serve", "rl"}
    loss = summary["results"]["loss"][0]
    assert loss["status"] == "pass" and loss["last_loss"] < loss["bar"] < loss["first_loss"]
    trained = summary["results"]["throughput"][1]
    assert trained["tok_per_s"] > 0 and trained["mfu"] is None  # a CPU has no peak FLOP/s entry


def test_past_the_deadline_everything_is_skipped_and_still_recorded(tmp_path):
    block, summary, _ = run_check(tmp_path, "--deadline-s", "0", "--sections", "loss,nccl")
    table = rows(block)
    assert table["3. loss falls | d2"] == "skipped: deadline"
    assert table["1. training throughput | d2 fa3"] == "skipped: not in --sections"
    statuses = [item["status"] for items in summary["results"].values() for item in items]
    assert set(statuses) == {"skipped: deadline", "skipped: not in --sections"}


@pytest.mark.slow
def test_two_rank_step_agrees_with_gloo(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when it runs as a script: bench/ on sys.path
    gpu_check = importlib.import_module("gpu_check")  # by name, so spawned ranks can import it too
    result = gpu_check.two_rank_step("cpu", gpu_check.SMOKE)
    assert result["status"] == "pass", result
    assert all(rank["moved"] == rank["params"] and rank["differ"] == 0 for rank in result["ranks"])


def test_the_device_command_runs_the_check_from_a_plain_checkout(tmp_path):
    """bench/gpu_run.sh, as given to a lent GPU: picochat importable from the checkout alone, the
    results and the log in $OUT, and a dependency the image lacks named in one line up front."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PICOCHAT_HOME": str(tmp_path / "home"), "OUT": str(tmp_path / "out"),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    checkout = tmp_path / "checkout"  # the files the device gets: no .git, no install of its own
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, checkout / name)
    command = ["bash", "bench/gpu_run.sh", "--smoke", "--sections", "loss"]
    proc = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"picochat from {checkout / 'picochat' / '__init__.py'}" in proc.stdout
    assert rows((tmp_path / "out" / "gpu_check.md").read_text())["3. loss falls | d2"].startswith("pass: ")
    assert "3. loss falls | d2 | pass: " in (tmp_path / "out" / "gpu_check.log").read_text()

    lacking = tmp_path / "lacking"  # an image without rustbpe
    lacking.mkdir()
    (lacking / "rustbpe.py").write_text("raise ModuleNotFoundError(\"No module named 'rustbpe'\")\n")
    lacking_env = {**env, "PYTHONPATH": str(lacking), "WHEELS": str(tmp_path / "none")}
    proc = subprocess.run(command, cwd=checkout, env=lacking_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-2:] == ["ModuleNotFoundError: No module named 'rustbpe'",
                                             "picochat cannot be imported here: run bench/device_wheels.sh, "
                                             "and carry .whl"]


def test_the_device_pipeline_runs_every_stage(tmp_path, pretrain_dir, core_bundle):
    """bench/gpu_pipeline.sh at its SMOKE sizes, through gpu_run.sh, on data laid out as
    bench/device_data.sh lays it out: every stage's log and time, and the report, come back in $OUT."""
    data = tmp_path / "device_data"
    shutil.copytree(pretrain_dir, data / "pretrain")
    shutil.make_archive(str(data / "eval_bundle"), "zip", core_bundle)
    write_task_mirror(data / "task_mirror")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PICOCHAT_HOME": str(tmp_path / "home"), "OUT": str(out),
           "DEVICE_DATA": str(data), "SMOKE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "bench/gpu_run.sh", "pipeline"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = ["tok-train", "tok-eval", "base-train", "base-eval", "chat-sft", "chat-eval", "report"]
    times = (out / "times.txt").read_text().splitlines()
    assert [line.split()[0] for line in times] == stages and all(line.endswith(" s") for line in times)
    assert all((out / f"{name}.log").stat().st_size > 0 for name in stages)
    report = (out / "report" / "report.md").read_text()
    assert "CORE (partial" in report and "## chat-sft" in report
    assert (out / "report" / "base_loss.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "report.md").exists()  # the report's copy in the working directory: $OUT, not the checkout
