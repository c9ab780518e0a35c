"""base-train: hyperparameters derived from depth (against the reference's table),
schedules at hand-computed points, the MFU formula, and real training runs on CPU:
a depth-2 model learns, resumed runs (from a periodic checkpoint and after SIGTERM)
reproduce the uninterrupted run's losses bit for bit, the compiled path runs, --fp8 trains,
two processes (on one node or two) make one run, and bad input gives one clear error."""

import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO, free_port

from picochat import checkpoint as ckpt
from picochat import cli
from picochat.common import PicochatError
from picochat.dataset import parquets_iter_batched
from picochat.gpt import GPT, config_from_depth
from picochat.recipes import RECIPES
from picochat.stages import base_train
from picochat.stages.base_train import (
    Plan,
    TrainConfig,
    main,
    plan_training,
    reference_scaling_params,
    run,
    scaling_params,
    with_preset_defaults,
)
from picochat.tokenizer import Tokenizer
from picochat.training import find_resume_step, lr_multiplier, muon_momentum, muon_weight_decay

# ---------------------------------------------------------------------------
# Derivation from depth and schedules: no training


@pytest.mark.parametrize("depth, ratio, batch, iterations, lr_scale, weight_decay", [
    # the derived table of the reference spec (vocab 32768, T 2048, ratio 12 unless noted)
    (12, 12, 524_288, 2_520, 1.0, 0.280),
    (20, 12, 1_048_576, 4_980, 1.414, 0.100),
    (24, 12, 1_048_576, 8_352, 1.414, 0.0597),
    (24, 8, 1_048_576, 5_568, 1.414, 0.0597),
    (26, 12, 1_048_576, 10_510, 1.414, 0.0475),
])
def test_plan_matches_reference_table(depth, ratio, batch, iterations, lr_scale, weight_decay):
    c = with_preset_defaults(TrainConfig(depth=depth, target_param_data_ratio=ratio))
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, 32768))
    plan = plan_training(c, scaling_params(model), reference_scaling_params(c, 32768), model.estimate_flops())
    assert plan.total_batch_size == batch
    assert plan.num_iterations == iterations
    assert plan.lr_scale == pytest.approx(lr_scale, abs=5e-4)
    assert plan.weight_decay == pytest.approx(weight_decay, abs=5e-4)
    assert plan.horizon == "--target-param-data-ratio"


def test_preset_fills_unset_lrs():
    jan29 = with_preset_defaults(TrainConfig(preset="jan29", matrix_lr=0.03))
    assert (jan29.unembedding_lr, jan29.weight_decay, jan29.matrix_lr) == (0.004, 0.2, 0.03)
    default = with_preset_defaults(TrainConfig())
    assert (default.embedding_lr, default.unembedding_lr, default.weight_decay, default.matrix_lr,
            default.scalar_lr) == (0.3, 0.008, 0.28, 0.02, 0.5)
    # the schedule flags too: the reference's 40 / 0.65 / 0.05, Jan-29's no warmup / 0.4 / 0
    assert (default.warmup_steps, default.warmdown_ratio, default.final_lr_frac) == (40, 0.65, 0.05)
    assert (jan29.warmup_steps, jan29.warmdown_ratio, jan29.final_lr_frac) == (0, 0.4, 0.0)
    given = with_preset_defaults(TrainConfig(preset="jan29", warmup_steps=7, warmdown_ratio=0.5, final_lr_frac=0.1))
    assert (given.warmup_steps, given.warmdown_ratio, given.final_lr_frac) == (7, 0.5, 0.1)
    zero = with_preset_defaults(TrainConfig(warmup_steps=0, final_lr_frac=0.0))  # 0 is a value, not "unset"
    assert (zero.warmup_steps, zero.final_lr_frac) == (0, 0.0)


def jan29_d24_plan(**overrides):
    c = with_preset_defaults(TrainConfig(preset="jan29", depth=24, target_param_data_ratio=12, **overrides))
    with torch.device("meta"):
        model = GPT(config_from_depth(24, 32768, preset="jan29"))
    return plan_training(c, scaling_params(model), reference_scaling_params(c, 32768), model.estimate_flops())


def test_jan29_weight_decay_scales_with_depth_squared():
    # Jan-29: 0.2 * (12/24)^2 = 0.05 at d24, whatever the batch; the current T_epoch rule gives the
    # default preset 0.28 * sqrt(2) * D_REF/D = 0.0597 there (see the table above)
    record = jan29_d24_plan()  # the preset's batch is the record's
    assert (record.total_batch_size, record.lr_scale, record.num_iterations) == (524_288, 1.0, 16_704)  # as published
    assert record.weight_decay == pytest.approx(0.05, rel=1e-12)
    auto = jan29_d24_plan(total_batch_size=-1)  # the depth-derived batch
    assert (auto.total_batch_size, auto.lr_scale) == (1_048_576, pytest.approx(math.sqrt(2)))
    assert auto.weight_decay == pytest.approx(0.05, rel=1e-12)
    c12 = with_preset_defaults(TrainConfig(preset="jan29", depth=12))
    assert plan_training(c12, 10**8, 10**8, 1e9).weight_decay == pytest.approx(0.2)
    c6 = with_preset_defaults(TrainConfig(preset="jan29", depth=6, weight_decay=0.1))
    assert plan_training(c6, 10**8, 4 * 10**8, 1e9).weight_decay == pytest.approx(0.4)  # 0.1 * 2^2


def test_plan_precedence_and_auto_batch_bands():
    n_ref = 110_100_912  # d12's scaling params
    c = with_preset_defaults(TrainConfig())
    # the batch depends only on N / N(d12): 2^round(log2(2^19 * ratio^0.383))
    assert plan_training(c, n_ref, n_ref, 1e9).total_batch_size == 2**19
    assert plan_training(c, int(n_ref * 4), n_ref, 1e9).total_batch_size == 2**20  # 4^0.383 = 1.70 -> 2^19.77
    assert plan_training(c, n_ref // 4, n_ref, 1e9).total_batch_size == 2**18
    # an explicit batch still scales lr and weight decay
    plan = plan_training(dataclasses.replace(c, total_batch_size=2**17), n_ref, n_ref, 1e9)
    assert (plan.total_batch_size, plan.lr_scale, plan.weight_decay) == (2**17, 0.5, 0.14)
    # --num-iterations beats --target-flops beats the ratio
    both = dataclasses.replace(c, num_iterations=7, target_flops=1e18)
    assert (plan_training(both, n_ref, n_ref, 1e9).num_iterations, plan_training(both, n_ref, n_ref, 1e9).horizon) \
        == (7, "--num-iterations")
    flops = dataclasses.replace(c, target_flops=1e18)
    assert plan_training(flops, n_ref, n_ref, 1e9).num_iterations == round(1e18 / (1e9 * 2**19))  # 1907
    with pytest.raises(PicochatError, match="0 training steps"):
        plan_training(dataclasses.replace(c, target_param_data_ratio=1e-6), n_ref, n_ref, 1e9)


def test_lr_multiplier_presets():
    default = with_preset_defaults(TrainConfig())
    jan29 = with_preset_defaults(TrainConfig(preset="jan29"))
    lrm = lambda c, it, n=1000: lr_multiplier(it, n, c.warmup_steps, c.warmdown_ratio, c.final_lr_frac)
    # default, n=1000: warmup 40 steps, warmdown round(0.65*1000) = 650 after step 350, to 0.05
    assert lrm(default, 0) == pytest.approx(1 / 40)
    assert lrm(default, 39) == lrm(default, 40) == lrm(default, 350) == 1.0
    assert lrm(default, 351) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lrm(default, 675) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lrm(default, 1000) == pytest.approx(0.05)
    # jan29, n=1000: no warmup, warmdown round(0.4*1000) = 400 after step 600, to 0
    assert lrm(jan29, 0) == lrm(jan29, 600) == 1.0
    assert lrm(jan29, 601) == pytest.approx(399 / 400)
    assert lrm(jan29, 800) == pytest.approx(0.5)
    assert lrm(jan29, 1000) == 0.0
    # the record's 16,704 steps: warmdown round(6681.6) = 6682 steps, starting after step 10,022
    assert lrm(jan29, 10_022, 16_704) == 1.0
    assert lrm(jan29, 10_023, 16_704) == pytest.approx(6681 / 6682)
    assert lrm(jan29, 13_363, 16_704) == pytest.approx(0.5)
    assert lrm(jan29, 16_704, 16_704) == 0.0


def test_momentum_and_weight_decay_presets():
    default, jan29 = RECIPES["default"], RECIPES["jan29"]
    # jan29: 0.85 -> 0.95 over 300 steps, then 0.95 through the warmdown to the end
    m = lambda it: muon_momentum(it, 1000, 0.4, jan29)
    assert m(0) == pytest.approx(0.85)
    assert m(150) == pytest.approx(0.90)
    assert m(299) == pytest.approx(0.85 + 0.1 * 299 / 300)
    assert m(300) == m(600) == m(601) == m(800) == m(1000) == pytest.approx(0.95)
    # default with n=1000, warmdown 0.65 (steps 350..1000): the 400-step ramp comes first
    m = lambda it: muon_momentum(it, 1000, 0.65, default)
    assert m(0) == pytest.approx(0.85)
    assert m(150) == pytest.approx(0.895)
    assert m(300) == pytest.approx(0.94)
    assert m(399) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert m(400) == pytest.approx(0.97 - 0.07 * 50 / 650)
    assert m(675) == pytest.approx(0.935)
    assert m(1000) == pytest.approx(0.90)
    # weight decay: linear (jan29) and cosine (default) from 0.05 to 0 over 1000 steps
    lin = lambda it: muon_weight_decay(it, 1000, 0.05, jan29.wd_schedule)
    cos = lambda it: muon_weight_decay(it, 1000, 0.05, default.wd_schedule)
    assert (lin(0), lin(250), lin(500), lin(750), lin(1000)) == pytest.approx((0.05, 0.0375, 0.025, 0.0125, 0.0))
    assert (cos(0), cos(500), cos(1000)) == pytest.approx((0.05, 0.025, 0.0))
    assert cos(250) == pytest.approx(0.025 * (1 + math.sqrt(0.5)))
    assert cos(750) == pytest.approx(0.025 * (1 - math.sqrt(0.5)))
    with pytest.raises(ValueError, match="unknown weight decay schedule"):
        muon_weight_decay(0, 10, 0.1, "step")


def test_setup_optimizer_uses_the_presets_muon_variant():
    plan = Plan(0, 0, 2**21, 2.0, 0.05, 10, "--num-iterations")
    for preset, variant in [("default", (1.01, True, True)), ("jan29", (1.02, False, False))]:
        c = with_preset_defaults(TrainConfig(preset=preset))
        model = GPT(config_from_depth(2, 300, max_seq_len=64, head_dim=64, window_pattern="L", preset=preset))
        s = plan.lr_scale
        opt = model.setup_optimizer(unembedding_lr=c.unembedding_lr * s, embedding_lr=c.embedding_lr * s,
                                    matrix_lr=c.matrix_lr * s, weight_decay=plan.weight_decay,
                                    scalar_lr=c.scalar_lr * s)
        assert (opt.polar_express_norm, opt.muon_eq, opt.muon_plus) == variant
        assert opt.muon_dtype == torch.float32
        muon = [g for g in opt.param_groups if g["kind"] == "muon"]
        assert all(g["lr"] == c.matrix_lr * 2.0 and g["weight_decay"] == 0.05 for g in muon)
        assert all(g["beta2"] == RECIPES[preset].muon_beta2 for g in muon)
        assert len(opt.param_groups) == len(model.optimizer_groups())


# ---------------------------------------------------------------------------
# Real runs: depth 2, T 64, 2 rows per pass, 256-token batches (2 accumulation steps).
# Such a small batch gets an lr scale of sqrt(256 / 2^19) = 1/45, so the base lrs are
# raised 10x for the model to learn visibly within 30 steps.

N = 30


@pytest.fixture
def home(picochat_home, small_tokenizer):
    small_tokenizer.save(picochat_home / "tokenizer")
    return picochat_home


def config(pretrain_dir, tag, **overrides) -> TrainConfig:
    base = dict(depth=2, max_seq_len=64, head_dim=64, window_pattern="L", device_batch_size=2, total_batch_size=256,
                embedding_lr=3.0, unembedding_lr=0.08, matrix_lr=0.2, num_iterations=N, warmup_steps=5,
                eval_every=15, eval_tokens=1024, core_metric_every=-1, sample_every=-1, save_every=15,
                dataset=str(pretrain_dir), model_tag=tag, compile="off")
    return TrainConfig(**(base | overrides))


def metrics(home, tag) -> list[dict]:
    return [json.loads(line) for line in (home / "base_checkpoints" / tag / "metrics.jsonl").read_text().splitlines()]


def deterministic(records) -> list[dict]:
    """The records without their timings."""
    return [{k: v for k, v in r.items() if k not in ("dt", "tok_per_s", "bf16_mfu")} for r in records]


def timed_steps(records) -> float:
    """The leaderboard clock by hand: the logged step times of global steps 11 and later."""
    return sum(r["dt"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r and r["step"] > 10)


def test_train_learn_resume_and_determinism(home, pretrain_dir, capsys):
    result = run(config(pretrain_dir, "a"))
    assert result["step"] == N and gc.isenabled()
    a = metrics(home, "a")
    train = [r for r in a if "loss" in r]
    evals = [r for r in a if "val_bpb" in r]
    assert [r["step"] for r in train] == list(range(N))
    assert [r["step"] for r in evals] == [0, 15, 30]
    # it learns: from ln(1024) = 6.93 clearly downwards, on the training and the validation data
    first, last = (sum(r["loss"] for r in rs) / 5 for rs in (train[:5], train[-5:]))
    assert first == pytest.approx(math.log(1024), abs=0.1) and last < first - 0.5
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 0.3
    # tok/s counts the whole batch (both accumulation steps); the CPU has no known peak: MFU is null
    for r in train:
        assert r["tok_per_s"] == pytest.approx(256 / r["dt"]) and r["bf16_mfu"] is None
        assert r["tokens"] == 256 * (r["step"] + 1) and r["flops"] > 0
        assert r["lrm"] == lr_multiplier(r["step"], N, 5, 0.65, 0.05)
    assert ckpt.complete_steps(home / "base_checkpoints" / "a") == [15, 30]
    meta = json.loads((home / "base_checkpoints" / "a" / "meta_000015.json").read_text())
    assert meta["loop_state"]["evals_done"] and meta["val_bpb"] == evals[1]["val_bpb"]
    assert (meta["world_size"], meta["preset"], meta["total_batch_size"]) == (1, "default", 256)
    assert result["total_training_time"] == pytest.approx(timed_steps(a), rel=1e-12)
    # the console prints the debiased EMA as loss_ema, and n/a for an MFU it cannot know
    out = capsys.readouterr().out
    assert f"step 00029/00030 (96.67%) | loss_ema: {train[-1]['loss_ema']:.6f} | " in out
    assert "| bf16 mfu: n/a |" in out and "peak bf16 FLOP/s: unknown" in out

    # resume from the step-15 checkpoint: metrics after it are dropped and redone identically, and
    # the clock counts the same steps (11..29) as the uninterrupted run's, not 11..14 and 26..29
    resumed = run(config(pretrain_dir, "a", resume_from_step=15))
    assert deterministic(metrics(home, "a")) == deterministic(a)
    assert resumed["total_training_time"] == pytest.approx(timed_steps(metrics(home, "a")), rel=1e-12)

    # another seed starts elsewhere
    run(config(pretrain_dir, "c", seed=7, num_iterations=2, eval_every=-1, save_every=-1))
    assert [r["loss"] for r in metrics(home, "c")] != [r["loss"] for r in train[:2]]

    # SIGTERM mid-run: the step finishes, a checkpoint is saved, the run stops
    path = home / "base_checkpoints" / "d" / "metrics.jsonl"

    def terminate_after_steps(count):
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= count:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=terminate_after_steps, args=(4,))
    killer.start()
    with pytest.raises(KeyboardInterrupt):
        run(config(pretrain_dir, "d", save_every=-1))
    killer.join()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is gone again
    (stopped,) = ckpt.complete_steps(home / "base_checkpoints" / "d")
    assert 4 <= stopped < N
    assert not ckpt.load_meta(home / "base_checkpoints" / "d", stopped)["loop_state"]["evals_done"]
    # up to there it is a second fresh run with the same seed: the same metrics as the first
    d = metrics(home, "d")
    assert len([r for r in d if "loss" in r]) == stopped
    assert deterministic(d) == deterministic(a[:len(d)])
    # --resume continues to exactly the uninterrupted run's metrics
    resumed = run(config(pretrain_dir, "d", save_every=-1, resume=True))
    assert deterministic(metrics(home, "d")) == deterministic(a)
    assert resumed["total_training_time"] == pytest.approx(timed_steps(metrics(home, "d")), rel=1e-12)


def test_jan29_run_applies_its_schedules(home, pretrain_dir, monkeypatch):
    seen = []
    apply_schedules = base_train.apply_schedules

    def spy(optimizer, lrm, momentum, weight_decay):
        seen.append((lrm, momentum, weight_decay))
        assert (optimizer.polar_express_norm, optimizer.muon_eq, optimizer.muon_plus) == (1.02, False, False)
        apply_schedules(optimizer, lrm, momentum, weight_decay)

    monkeypatch.setattr(base_train, "apply_schedules", spy)
    run(config(pretrain_dir, "jan29", preset="jan29", warmup_steps=None, num_iterations=4, eval_every=-1,
               save_every=-1))
    # 4 steps: no warmup, warmdown round(0.4 * 4) = 2 steps after step 2; momentum 0.85 + 0.1 * it/300;
    # weight decay 0.2 * (12/2)^2 = 7.2 at depth 2, linear to 0 at step 4
    lrm, momentum, wd = zip(*seen)
    assert lrm == (1.0, 1.0, 1.0, 0.5)
    assert momentum == pytest.approx([0.85 + 0.1 * it / 300 for it in range(4)])
    assert wd == pytest.approx([7.2, 5.4, 3.6, 1.8])
    records = metrics(home, "jan29")
    assert [r["lrm"] for r in records] == [1.0, 1.0, 1.0, 0.5]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_default_run_applies_its_schedules(home, pretrain_dir, monkeypatch):
    seen = []
    apply_schedules = base_train.apply_schedules

    def spy(optimizer, lrm, momentum, weight_decay):
        seen.append((lrm, momentum, weight_decay))
        assert (optimizer.polar_express_norm, optimizer.muon_eq, optimizer.muon_plus) == (1.01, True, True)
        apply_schedules(optimizer, lrm, momentum, weight_decay)

    monkeypatch.setattr(base_train, "apply_schedules", spy)
    run(config(pretrain_dir, "sched", warmup_steps=None, num_iterations=4, eval_every=-1, save_every=-1))
    # the reference's schedules (spec 7.1-7.3) at 4 steps: lr warmup over 40 steps, (it + 1) / 40;
    # Muon momentum 0.85 -> 0.97 over 400 steps; weight decay a half cosine to 0 at step 4
    lrm, momentum, wd = zip(*seen)
    assert lrm == pytest.approx([1 / 40, 2 / 40, 3 / 40, 4 / 40])
    assert momentum == pytest.approx([0.85 + 0.12 * it / 400 for it in range(4)])
    assert [w / wd[0] for w in wd] == pytest.approx([0.5 * (1 + math.cos(math.pi * it / 4)) for it in range(4)])


@pytest.mark.slow
def test_compiled_path(home, pretrain_dir):
    # compiling the model takes most of this test's time (the optimizer's kernels, compiled per
    # parameter shape, are already compiled for these shapes by the other runs)
    small = dict(num_iterations=3, eval_every=-1, save_every=-1)
    run(config(pretrain_dir, "eager", **small))
    run(config(pretrain_dir, "compiled", compile="on", **small))
    eager, compiled = ([r["loss"] for r in metrics(home, tag)] for tag in ("eager", "compiled"))
    assert len(compiled) == 3 and all(math.isfinite(x) for x in compiled)
    assert compiled == pytest.approx(eager, rel=1e-5)
    # the checkpoint of a compiled model has plain keys and loads for evaluation
    model, _, meta = ckpt.load_model("base", "cpu", torch.float32, model_tag="compiled")
    assert meta["step"] == 3 and not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_fp8_run(home, pretrain_dir, capsys):
    """--fp8 (width 128, so the block matrices and lm_head convert), compiled as on a GPU: it learns
    about as the plain run does, evaluates with fp8 off (the logged val bpb is the saved weights'
    bpb in the compute dtype), saves a checkpoint a plain model loads, and a resume without --fp8
    is another run."""
    from picochat.dataloader import DataLoader
    from picochat.loss_eval import evaluate_bpb
    from picochat.tokenizer import get_token_bytes

    wide = dict(aspect_ratio=64, num_iterations=20, eval_every=20, save_every=-1)
    run(config(pretrain_dir, "plain", **wide))
    run(config(pretrain_dir, "fp8", fp8=True, compile="on", **wide))  # compiled, as on a GPU
    out = capsys.readouterr().out
    assert ("fp8 (tensorwise scaling) for 13 of 15 matmuls; in float32: transformer.h.1.attn.ve_gate, smear_gate "
            "(smaller than 128 or not a multiple of 16), and every evaluation") in out
    plain, low = metrics(home, "plain"), metrics(home, "fp8")
    train_plain, train_low = ([r for r in m if "loss" in r] for m in (plain, low))
    assert train_low[0]["loss"] == pytest.approx(math.log(1024), abs=0.1)
    assert train_low[-1]["loss"] == pytest.approx(train_plain[-1]["loss"], rel=0.02)  # measured: 0.1% apart
    assert train_low[-1]["loss"] < train_low[0]["loss"] - 0.5
    model, tokenizer, meta = ckpt.load_model("base", "cpu", torch.float32, model_tag="fp8")
    assert meta["user_config"]["fp8"] is True
    loader = DataLoader(tokenizer, 2, 64, "val", pretrain_dir, torch.device("cpu"))
    bpb = evaluate_bpb(model, loader, 1024 // (2 * 64), get_token_bytes(torch.device("cpu")))
    assert [r["val_bpb"] for r in low if "val_bpb" in r][-1] == pytest.approx(bpb, rel=1e-5)
    with pytest.raises(PicochatError, match=r"--fp8 True -> False"):
        run(config(pretrain_dir, "fp8", resume=True, **wide))


def test_core_samples_and_wandb_hooks(home, pretrain_dir, core_bundle, monkeypatch, capsys):
    # the 22-task bundle with one task's data file missing: CORE in training runs the other 21
    bundle = home / "bundle"
    shutil.copytree(core_bundle, bundle)
    missing = next((bundle / "eval_data").rglob("copa.jsonl"))
    missing.unlink()
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(bundle))
    monkeypatch.setenv("WANDB_MODE", "disabled")  # in case wandb is installed: never reach the network
    run(config(pretrain_dir, "hooks", num_iterations=2, eval_every=-1, core_metric_every=1,
               core_metric_max_per_task=12, sample_every=2, run="named"))
    records = metrics(home, "hooks")
    # a subset, and a capped run, is never logged or printed as CORE: the name says what it left out
    assert not any("core" in r for r in records)
    core = [r for r in records if "core_partial_21of22_max12" in r]
    assert [r["step"] for r in core] == [1, 2]
    assert all(-1 <= r["core_partial_21of22_max12"] <= 1 for r in core)
    out = capsys.readouterr().out
    assert "CORE during training is partial (21/22 tasks)" in out
    assert "step 00001 | CORE (partial: 21/22 tasks, at most 12 examples per task): " in out
    assert "| CORE:" not in out
    assert "'The capital of France is' -> " in out

    # all 22 tasks, uncapped: that alone is "core"
    shutil.copy(next(core_bundle.rglob("copa.jsonl")), missing)
    run(config(pretrain_dir, "full", num_iterations=1, eval_every=-1, core_metric_every=1,
               core_metric_max_per_task=-1))
    assert [sorted(r) for r in metrics(home, "full") if "loss" not in r] == [["core", "step"]]
    assert "step 00001 | CORE: " in capsys.readouterr().out

    (bundle / "core.yaml").unlink()  # a broken bundle fails before any training, not at the first CORE
    with pytest.raises(PicochatError, match="no core.yaml"):
        run(config(pretrain_dir, "hooks2", core_metric_every=1))
    assert not (home / "base_checkpoints" / "hooks2").exists()


def test_flags_and_resume_target_are_checked_before_the_bundle_is_fetched(home, pretrain_dir, monkeypatch):
    # a bundle URL where nothing listens: fetching it fails at once
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", f"http://127.0.0.1:{free_port()}/eval_bundle.zip")
    fetches = []
    load_bundle = base_train.load_bundle
    monkeypatch.setattr(base_train, "load_bundle", lambda: fetches.append(1) or load_bundle())
    with pytest.raises(PicochatError, match="valid --device-batch-size values"):
        run(config(pretrain_dir, "net", device_batch_size=3, core_metric_every=10))
    with pytest.raises(PicochatError, match="no complete checkpoint at step 5"):
        run(config(pretrain_dir, "net", resume_from_step=5, core_metric_every=10))
    assert fetches == []
    # with every flag right, the fetch fails with a message that says how to go on
    with pytest.raises(PicochatError, match=r"could not download the eval bundle .*set PICOCHAT_EVAL_BUNDLE to a "
                                            r"local copy of the bundle, or pass --core-metric-every -1"):
        run(config(pretrain_dir, "net", core_metric_every=10))
    assert fetches == [1]


# ---------------------------------------------------------------------------
# Errors


def test_errors(home, pretrain_dir, monkeypatch, capsys):
    with pytest.raises(PicochatError, match="either --resume .* or --resume-from-step"):
        run(config(pretrain_dir, "e", resume=True, resume_from_step=3))
    with pytest.raises(PicochatError, match="valid --device-batch-size values: 1, 2, 4$"):
        run(config(pretrain_dir, "e", device_batch_size=3))
    with pytest.raises(PicochatError, match="does not exist"):
        run(config(pretrain_dir, "e", dataset=str(home / "no_such_data")))
    with pytest.raises(PicochatError, match="no complete checkpoint at step 3 .*saved: none"):
        run(config(pretrain_dir, "e", resume_from_step=3))

    run(config(pretrain_dir, "e", num_iterations=2, eval_every=-1))
    with pytest.raises(PicochatError, match="another model config.*n_layer 2 vs 3"):
        run(config(pretrain_dir, "e", num_iterations=2, depth=3, resume=True))
    meta_file = ckpt.meta_path(home / "base_checkpoints" / "e", 2)
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(meta | {"world_size": 2}))
    with pytest.raises(PicochatError, match="saved by 2 process.*same number"):
        run(config(pretrain_dir, "e", num_iterations=2, resume=True))

    # the CLI prints the one-line error, no traceback
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, ["--resume", "--overwrite"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: --overwrite starts over and --resume continues: pass one of them"
    with pytest.raises(PicochatError, match=r"--fp8 needs --device-batch-size x --max-seq-len divisible by 16 "
                       r"\(the fp8 GEMM's rule; got 1 x 24\)"):
        run(config(pretrain_dir, "e", fp8=True, device_batch_size=1, max_seq_len=24))

    (home / "tokenizer" / "tokenizer.pkl").unlink()
    with pytest.raises(PicochatError, match="run `picochat tok-train` first"):
        run(config(pretrain_dir, "e"))


# ---------------------------------------------------------------------------
# The GPU's paths on CPU: fp16 with loss scaling, bf16 with a sliding window, two processes,
# and the out-of-memory message


def test_fp16_grad_scaler_skips_an_overflow_and_resumes_exactly(home, pretrain_dir, monkeypatch):
    # PICOCHAT_DTYPE=float16 gives the run a GradScaler. One micro-batch's gradient is made
    # infinite (a hook on its loss, step 1): the scaler must skip that optimizer step and halve
    # its scale, and checkpoint the result; a resume from step 4 must then carry on exactly.
    monkeypatch.setenv("PICOCHAT_DTYPE", "float16")
    poison = {"call": 2, "calls": 0}  # training forwards 2 and 3 are step 1 (2 accumulation steps)
    forward = GPT.forward

    def poisoned_forward(self, idx, targets=None, *args, **kwargs):
        loss = forward(self, idx, targets, *args, **kwargs)
        if targets is not None and torch.is_grad_enabled():
            if poison["calls"] == poison["call"]:
                loss.register_hook(lambda grad: grad * math.inf)
            poison["calls"] += 1
        return loss

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    small = dict(num_iterations=8, warmup_steps=2, eval_every=8, save_every=4)
    run(config(pretrain_dir, "fp16", **small))
    assert poison["calls"] == 16
    ckpt_dir = home / "base_checkpoints" / "fp16"
    full = metrics(home, "fp16")
    train = [r for r in full if "loss" in r]
    assert [r["step"] for r in train] == list(range(8)) and all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in full if "val_bpb" in r] == [0, 8] and all(
        math.isfinite(r["val_bpb"]) for r in full if "val_bpb" in r)
    assert ckpt.load_meta(ckpt_dir, 8)["compute_dtype"] == "torch.float16"

    def shard(step):
        return torch.load(ckpt.optim_path(ckpt_dir, step, 0), weights_only=False)

    # the scaler's state is checkpointed: halved once by the overflow (default scale 2^16,
    # growth only after 2000 clean steps), and the clean steps since then counted
    assert shard(4)["scaler"]["scale"] == 2.0**15 and shard(4)["scaler"]["_growth_tracker"] == 2
    assert shard(8)["scaler"]["scale"] == 2.0**15 and shard(8)["scaler"]["_growth_tracker"] == 6
    # the skipped step did not reach the optimizer: AdamW counted 3 updates by step 4, 7 by step 8
    assert shard(4)["optimizer"]["state"][0]["step"] == 3 and shard(8)["optimizer"]["state"][0]["step"] == 7
    final = {k: v.clone() for k, v in torch.load(ckpt.model_path(ckpt_dir, 8)).items()}

    # resume from step 4 (no more poison): bit-identical losses, val bpb, weights and scaler state.
    # Bit-exact in fp16 too (deterministic CPU kernels), but only with the scale restored: the
    # fp16 activation gradients depend on it (tiny ones round differently near fp16's subnormal
    # range), so resuming at the default 2^16 instead of 2^15 changes the loss from step 5 on
    poison["call"] = None
    run(config(pretrain_dir, "fp16", resume_from_step=4, **small))
    assert deterministic(metrics(home, "fp16")) == deterministic(full)
    assert shard(8)["scaler"] == {"scale": 2.0**15, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 6}
    assert shard(8)["optimizer"]["state"][0]["step"] == 7
    resumed = torch.load(ckpt.model_path(ckpt_dir, 8))
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)


def test_bf16_sliding_window_run_learns(home, pretrain_dir, monkeypatch, capsys):
    # bf16 compute: bf16 embeddings, Polar Express in bf16, and at T=256 the short window of "SL"
    # (ceil(256 / 4 / 128) * 128 = 128 tokens) cuts the context, so layer 0 runs SDPA with a dense
    # mask. Narrow (width 64, two heads of 32) because bf16 matmuls are slow on most CPUs.
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    optimizers = []
    setup_optimizer = GPT.setup_optimizer

    def spy(self, *args, **kwargs):
        optimizers.append(setup_optimizer(self, *args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(GPT, "setup_optimizer", spy)
    n = 20
    run(config(pretrain_dir, "bf16", depth=2, aspect_ratio=32, head_dim=32, max_seq_len=256, window_pattern="SL",
               device_batch_size=1, total_batch_size=256, num_iterations=n, eval_every=-1, save_every=-1))
    out = capsys.readouterr().out
    assert "compute dtype: torch.bfloat16" in out
    assert "attention at T=256, window 128 (layers 0): sdpa with a dense T x T mask (SLOW)" in out
    assert "attention at T=256, full context (layers 1): sdpa (causal)" in out
    (optimizer,) = optimizers
    assert optimizer.muon_dtype == torch.bfloat16
    state = torch.load(ckpt.model_path(home / "base_checkpoints" / "bf16", n))
    assert state["transformer.wte.weight"].dtype == torch.bfloat16  # bf16 embeddings
    assert state["lm_head.weight"].dtype == torch.float32  # fp32 master weights elsewhere
    train = [r["loss"] for r in metrics(home, "bf16")]
    assert len(train) == n and all(math.isfinite(x) for x in train)
    first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
    assert first == pytest.approx(math.log(1024), abs=0.1) and last < first - 0.5  # measured: 6.90 -> 5.96


def write_multi_row_group_data(src, dst, train_group=100, val_group=16):
    """The shared shards rewritten with small row groups, so that every one of 2 ranks gets
    data (rank r reads row groups r, r+2, ...; the shared val shard has a single row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst.mkdir()
    for name, group in [("shard_00000.parquet", train_group), ("shard_00001.parquet", val_group)]:
        texts = pq.read_table(src / name, columns=["text"]).column("text").to_pylist()
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), dst / name, row_group_size=group)
        assert pq.ParquetFile(dst / name).num_row_groups >= 4
    return dst


PEAK = 1e9  # FLOP/s per process in the 2-process runs


def _train_rank(rank, world, ports, out_dir, kwargs, resume_step, fp16_kwargs, unsynced_found_inf=False):
    """One of the 2 processes: an uninterrupted run, a resume of it from resume_step, then a short
    fp16 run in which only rank 1's gradients overflow (at step 1)."""
    torch.set_num_threads(1)
    # Compile in this thread: a compile thread pool the parent started before the fork has no
    # threads here (torch resets its compile process pool after a fork, not its thread pool), so
    # a kernel the inductor cache lacks would wait on it forever
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = 1
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      PICOCHAT_PEAK_FLOPS=str(PEAK))  # a known peak, so the logged MFU can be checked by hand
    # the patches below live in this forked process only
    models = []
    build_model = base_train.build_model
    base_train.build_model = lambda *args, **kw: models.append(build_model(*args, **kw)) or models[-1]
    weights = []
    for port, extra in zip(ports, [{}, {"resume_from_step": resume_step}]):
        os.environ["MASTER_PORT"] = str(port)
        run(TrainConfig(**(kwargs | extra)))
        weights.append([p.detach().clone() for p in models[-1].parameters()])
        if rank == 0 and not extra:
            metrics_file = ckpt.checkpoint_dir("base", kwargs["model_tag"]) / "metrics.jsonl"
            (out_dir / "metrics_uninterrupted.jsonl").write_text(metrics_file.read_text())

    forward, calls = GPT.forward, []

    def forward_overflowing_on_rank_1(self, idx, targets=None, *args, **kw):
        loss = forward(self, idx, targets, *args, **kw)
        if targets is not None and torch.is_grad_enabled():
            if rank == 1 and len(calls) == 1:  # step 1 (1 accumulation step)
                loss.register_hook(lambda grad: grad * math.inf)
            calls.append(1)
        return loss

    GPT.forward = forward_overflowing_on_rank_1
    if unsynced_found_inf:  # what base_train would do without its all-reduce of found_inf
        torch.amp.GradScaler._found_inf_per_device = lambda self, optimizer: {}
    os.environ.update(MASTER_PORT=str(ports[2]), PICOCHAT_DTYPE="float16")
    run(TrainConfig(**fp16_kwargs))
    weights.append([p.detach().clone() for p in models[-1].parameters()])
    torch.save(weights, out_dir / f"rank{rank}.pt")


def train_two_processes(out_dir, *args, timeout=300):
    """_train_rank on 2 forked processes; fails (rather than hangs) when they do not finish in time,
    e.g. because one rank entered a collective the other skipped."""
    import torch.multiprocessing as mp

    # fork, as in test_optim: the workers inherit the imports and the kernels compiled so far
    context = mp.start_processes(_train_rank, args=(2, (free_port(), free_port(), free_port()), out_dir, *args),
                                 nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 training processes did not finish within {timeout} s")


def test_two_processes_train_resume_and_skip_overflows_together(home, pretrain_dir, tmp_path):
    data = write_multi_row_group_data(pretrain_dir, tmp_path / "data")
    n, k = 8, 4
    # 2 rows x 64 tokens x 2 processes = the 256-token batch: 1 accumulation step per process
    kwargs = dataclasses.asdict(config(data, "ddp", num_iterations=n, warmup_steps=2, eval_every=k, save_every=k))
    fp16_kwargs = kwargs | dict(model_tag="ddp16", num_iterations=4, eval_every=-1, save_every=-1)
    train_two_processes(tmp_path, kwargs, k, fp16_kwargs)
    (full0, resumed0, fp16_0), (full1, resumed1, fp16_1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # the ranks agree on every weight, and the resumed run ends on exactly the same weights
    n_params = len(list(GPT(config_from_depth(2, 1024, 64, head_dim=64, window_pattern="L")).parameters()))
    assert len(full0) == len(full1) == len(resumed0) == len(resumed1) == n_params
    for a, b, c, d in zip(full0, full1, resumed0, resumed1):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    ckpt_dir = home / "base_checkpoints" / "ddp"
    full = [json.loads(line) for line in (tmp_path / "metrics_uninterrupted.jsonl").read_text().splitlines()]
    assert [r["step"] for r in full if "loss" in r] == list(range(n))
    assert all(math.isfinite(r["loss"]) for r in full if "loss" in r)
    assert [r["step"] for r in full if "val_bpb" in r] == [0, 4, 8]
    assert full[-1]["val_bpb"] < full[0]["val_bpb"]
    assert deterministic(metrics(home, "ddp")) == deterministic(full)  # the resume: bit for bit
    # the whole batch of both ranks is counted: 2 rows x 64 tokens x 2 processes per step, and MFU is
    # model FLOPs over the peak of both processes
    flops_per_token = GPT(config_from_depth(2, 1024, 64, head_dim=64, window_pattern="L")).estimate_flops()
    for r in (r for r in full if "loss" in r):
        assert r["tokens"] == 2 * 64 * 2 * (r["step"] + 1) and r["flops"] == flops_per_token * r["tokens"]
        assert r["bf16_mfu"] == pytest.approx(100 * flops_per_token * 256 / r["dt"] / (2 * PEAK), rel=1e-12)
        assert r["bf16_mfu"] > 0

    assert ckpt.complete_steps(ckpt_dir) == [k, n] and ckpt.load_meta(ckpt_dir, n)["world_size"] == 2
    shards = [torch.load(ckpt.optim_path(ckpt_dir, n, r), weights_only=False) for r in range(2)]
    assert not ckpt.optim_path(ckpt_dir, n, 2).exists()
    # ZeRO-2: each rank holds its own half of lm_head's AdamW moments (state 0: the first group)
    lm_head = torch.load(ckpt.model_path(ckpt_dir, n))["lm_head.weight"]
    moments = [s["optimizer"]["state"][0]["exp_avg"] for s in shards]
    assert all(m.shape == (lm_head.shape[0] // 2, lm_head.shape[1]) for m in moments)
    assert not torch.equal(moments[0], moments[1])
    # and its own place in the data: rank r reads row groups r, r+2, ...
    assert shards[0]["loader"] != shards[1]["loader"]
    assert not torch.equal(shards[0]["batch"][0], shards[1]["batch"][0])

    # fp16: rank 1's overflow at step 1 makes both ranks skip that step (found_inf is all-reduced;
    # without that, rank 0 alone would enter the optimizer's collectives and wait forever)
    assert len(fp16_0) == len(fp16_1) == n_params and all(torch.equal(a, b) for a, b in zip(fp16_0, fp16_1))
    assert all(math.isfinite(r["loss"]) for r in metrics(home, "ddp16")) and len(metrics(home, "ddp16")) == 4
    for r in range(2):
        shard = torch.load(ckpt.optim_path(home / "base_checkpoints" / "ddp16", 4, r), weights_only=False)
        assert shard["scaler"]["scale"] == 2.0**15 and shard["scaler"]["_growth_tracker"] == 2
        assert shard["optimizer"]["state"][0]["step"] == 3  # 4 steps, 1 skipped


def test_two_nodes_train_as_one_node_with_two_processes(home, pretrain_dir, tmp_path, monkeypatch):
    """The README's multi-node command, two "nodes" of one process each on this machine (torchrun's
    static rendezvous at --master_addr), against one node of two processes (--standalone): the same
    run, loss for loss and weight for weight."""
    data = write_multi_row_group_data(pretrain_dir, tmp_path / "data")
    monkeypatch.setenv("PICOCHAT_DTYPE", "float32")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = ["-m", "picochat", "base-train", "--depth", "2", "--max-seq-len", "64", "--head-dim", "64",
            "--window-pattern", "L", "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "3",
            "--eval-every", "3", "--eval-tokens", "512", "--core-metric-every", "-1", "--sample-every", "-1",
            "--dataset", str(data), "--compile", "off", "--device-type", "cpu", "--embedding-lr", "3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]

    def launch(launcher, tag, log):
        # output to a file: an unread pipe that fills up would stall the node writing to it
        with open(log, "w") as f:
            return subprocess.Popen([*torchrun, *launcher, *args, "--model-tag", tag], env=env, cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT)

    def finish(processes, logs):
        try:
            for process, log in zip(processes, logs):
                assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            for process in processes:  # a node left waiting for a failed one
                process.kill()

    port = str(free_port())
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    finish([launch(["--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                    "--nproc_per_node", "1"], "nodes", log) for rank, log in zip((0, 1), logs)], logs)
    finish([launch(["--standalone", "--nproc_per_node", "2"], "one", tmp_path / "one.log")], [tmp_path / "one.log"])
    assert deterministic(metrics(home, "nodes")) == deterministic(metrics(home, "one"))
    assert [r["step"] for r in metrics(home, "nodes") if "val_bpb" in r] == [0, 3]
    assert ckpt.load_meta(home / "base_checkpoints" / "nodes", 3)["world_size"] == 2
    a, b = (torch.load(ckpt.model_path(home / "base_checkpoints" / tag, 3)) for tag in ("nodes", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("batch_size, advice", [
    (2, r"try a smaller --device-batch-size \(e\.g\. 1; gradient accumulation keeps the total batch\)$"),
    (1, "it does not fit even at 1: use a smaller --depth or shorter sequences$"),
])
def test_out_of_memory_in_a_training_step(home, pretrain_dir, monkeypatch, capsys, batch_size, advice):
    forward = GPT.forward

    def forward_out_of_memory(self, idx, targets=None, *args, **kwargs):
        if torch.is_grad_enabled():  # training; validation runs without gradients
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, idx, targets, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_out_of_memory)
    c = config(pretrain_dir, "oom", device_batch_size=batch_size, num_iterations=2, eval_every=1, save_every=-1)
    with pytest.raises(PicochatError, match=f"^out of memory in a training step at --device-batch-size "
                                            f"{batch_size}: " + advice) as error:
        run(c)
    assert "\n" not in str(error.value)
    assert [r["step"] for r in metrics(home, "oom")] == [0]  # the validation at step 0 ran; no step did
    assert gc.isenabled()
    # on the command line: one line, no traceback
    capsys.readouterr()
    args = ["--depth", "2", "--max-seq-len", "64", "--head-dim", "64", "--window-pattern", "L",
            "--device-batch-size", str(batch_size), "--total-batch-size", "256", "--num-iterations", "2",
            "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1", "--dataset", str(pretrain_dir),
            "--model-tag", "oom", "--compile", "off"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory in a training step") and "Traceback" not in err


def test_out_of_memory_in_validation(home, pretrain_dir, monkeypatch):
    def forward_out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(GPT, "forward", forward_out_of_memory)
    with pytest.raises(PicochatError, match=r"^out of memory in validation at --device-batch-size 2: try a smaller "
                                            r"--device-batch-size \(e\.g\. 1\)$"):
        run(config(pretrain_dir, "oom", num_iterations=2, eval_every=1))


# ---------------------------------------------------------------------------
# Resume guards: the compute dtype, and ranks that cannot see rank 0's checkpoint


def test_resume_refuses_another_dtype_or_batch(home, pretrain_dir, monkeypatch):
    run(config(pretrain_dir, "dt", num_iterations=3, eval_every=-1, save_every=2))
    meta = json.loads((home / "base_checkpoints" / "dt" / "meta_000003.json").read_text())
    assert meta["compute_dtype"] == "torch.float32"
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    with pytest.raises(PicochatError, match=r"trained in torch\.float32, this run computes in torch\.bfloat16: "
                                            r"resume with the same dtype \(PICOCHAT_DTYPE=float32\)"):
        run(config(pretrain_dir, "dt", num_iterations=3, eval_every=-1, save_every=2, resume=True))
    monkeypatch.delenv("PICOCHAT_DTYPE")
    with pytest.raises(PicochatError, match=r"trained with other settings \(--total-batch-size 256 -> 512\)"):
        run(config(pretrain_dir, "dt", num_iterations=3, eval_every=-1, save_every=2, resume=True,
                   total_batch_size=512))


def test_a_fresh_run_refuses_a_tag_with_checkpoints(home, pretrain_dir, capsys):
    """Forgetting --resume after a crash must not wipe the run."""
    run(config(pretrain_dir, "keep", num_iterations=3, eval_every=-1, save_every=2))
    folder = home / "base_checkpoints" / "keep"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(PicochatError, match=r"already has checkpoints \(steps 2, 3\): pass --resume to continue "
                                            r"that run, --overwrite to delete them and start over"):
        run(config(pretrain_dir, "keep", num_iterations=3, eval_every=-1, save_every=2))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # not a byte changed
    capsys.readouterr()
    run(config(pretrain_dir, "keep", num_iterations=2, eval_every=-1, save_every=-1, overwrite=True))
    assert "--overwrite: removed the 2 earlier checkpoint(s)" in capsys.readouterr().out
    assert ckpt.complete_steps(folder) == [2]


def test_resume_refuses_settings_that_change_the_run(home, pretrain_dir, tmp_path):
    n = 6
    same_text_elsewhere = shutil.copytree(pretrain_dir, tmp_path / "copy")
    full = run(config(pretrain_dir, "flags", num_iterations=n, eval_every=3, save_every=3))
    uninterrupted = metrics(home, "flags")
    with pytest.raises(PicochatError, match=r"trained with other settings \(--matrix-lr 0\.2 -> 0\.3; "
                                            r"--warmdown-ratio 0\.65 -> 0\.5\): resume with the checkpoint's values"):
        run(config(pretrain_dir, "flags", num_iterations=n, matrix_lr=0.3, warmdown_ratio=0.5, resume_from_step=3))
    for changed in (dict(seed=7), dict(num_iterations=8), dict(dataset=str(same_text_elsewhere)),
                    dict(preset="jan29")):
        with pytest.raises(PicochatError, match="trained with other settings|another model config"):
            run(config(pretrain_dir, "flags", **(dict(num_iterations=n) | changed), resume_from_step=3))
    # cadences and logging cannot change the trajectory: they may differ
    resumed = run(config(pretrain_dir, "flags", num_iterations=n, eval_every=2, save_every=-1, sample_every=5,
                         eval_tokens=512, resume_from_step=3, run="dummy"))
    losses = lambda records: deterministic([r for r in records if "loss" in r])
    assert losses(metrics(home, "flags")) == losses(uninterrupted)
    assert resumed["step"] == full["step"] == n


def test_the_tokenizer_is_part_of_a_checkpoint(home, pretrain_dir, small_tokenizer):
    """A tokenizer retrained to the same size maps ids to other strings: resume and eval refuse it."""
    run(config(pretrain_dir, "tok", num_iterations=2, eval_every=-1))
    meta = ckpt.load_meta(home / "base_checkpoints" / "tok", 2)
    assert meta["tokenizer"] == small_tokenizer.fingerprint()
    texts = [t for batch in parquets_iter_batched("val", data_dir=pretrain_dir) for t in batch]
    other = Tokenizer.train_from_iterator(texts, vocab_size=small_tokenizer.get_vocab_size())
    assert other.get_vocab_size() == small_tokenizer.get_vocab_size()
    assert other.fingerprint() != small_tokenizer.fingerprint()
    other.save(home / "tokenizer")
    message = "trained with another tokenizer than the one in \\$PICOCHAT_HOME"
    with pytest.raises(PicochatError, match=message):
        run(config(pretrain_dir, "tok", num_iterations=2, eval_every=-1, resume=True))
    with pytest.raises(PicochatError, match=message):
        ckpt.load_model("base", "cpu", torch.float32, model_tag="tok")
    small_tokenizer.save(home / "tokenizer")
    model, _, _ = ckpt.load_model("base", "cpu", torch.float32, model_tag="tok")
    assert model.config.vocab_size == 1024


def _resume_step_rank(rank, port, folders, cases, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for resume_from_step in cases:
            try:
                results[rank, resume_from_step] = find_resume_step(folders[rank], True, resume_from_step, False,
                                                                   rank, ddp=True)
            except PicochatError as e:
                results[rank, resume_from_step] = str(e)
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_rank_0s_choice(tmp_path):
    """Two "nodes" without a shared file system: rank 0 sees steps 5 and 10, rank 1 only 5 (a
    stale copy). Rank 0 picks the step; a rank that lacks it stops instead of training out of
    step, and an error on rank 0 reaches every rank."""
    import torch.multiprocessing as mp

    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder, steps in zip(folders, ([5, 10], [5])):
        for step in steps:
            ckpt.save_checkpoint(folder, step, {"w": torch.zeros(1)}, {}, {"step": step}, rank=0)
    expected = {-1: [10, "rank 1 cannot see the checkpoint at step 10"],  # --resume: rank 0's latest
                5: [5, 5],  # --resume-from-step 5: both have it
                7: ["no complete checkpoint at step 7"] * 2}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_resume_step_rank, args=(free_port(), folders, list(expected), results), nprocs=2,
                           start_method="fork")
        got = dict(results)
    for case, wants in expected.items():
        for rank, want in enumerate(wants):
            value = got[rank, case]
            assert value == want if isinstance(want, int) else want in value, (case, rank, value)
