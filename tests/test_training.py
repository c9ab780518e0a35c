"""The shared training pieces (picochat/training.py) against hand-computed values: gradient
accumulation, schedules, the loss EMA, the leaderboard clock, which checkpoint a run resumes
(and that a fresh run never deletes one unasked), the flags a resume may change, the metrics log."""

import json
import math

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.recipes import RECIPES
from picochat.training import (
    UNTIMED_STEPS,
    LoopState,
    MetricsLog,
    changed_flags,
    grad_accum_steps,
    lr_multiplier,
    model_flops_utilization,
    muon_momentum,
    muon_weight_decay,
    pick_resume_step,
)


def test_grad_accum_steps():
    assert grad_accum_steps(524_288, 32, 2048, 8) == 1
    assert grad_accum_steps(524_288, 16, 2048, 8) == 2
    assert grad_accum_steps(1_048_576, 4, 2048, 1) == 128
    with pytest.raises(PicochatError, match=r"valid --device-batch-size values: 1, 2, 4, 8, 16$"):
        grad_accum_steps(2048, 3, 128, 1)
    with pytest.raises(PicochatError, match="not a multiple of max_seq_len x world size = 100 x 1"):
        grad_accum_steps(2048, 1, 100, 1)


def test_lr_multiplier():
    # n=100, warmup 10, warmdown round(0.5*100)=50 starting after step 50, final 0.1
    lrm = lambda it: lr_multiplier(it, 100, 10, 0.5, 0.1)
    assert lrm(0) == pytest.approx(0.1)  # (0+1)/10
    assert lrm(4) == pytest.approx(0.5)
    assert lrm(9) == pytest.approx(1.0)
    assert lrm(10) == lrm(50) == 1.0
    assert lrm(51) == pytest.approx(0.98 + 0.02 * 0.1)  # p = 49/50
    assert lrm(75) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lrm(100) == pytest.approx(0.1)
    assert lr_multiplier(5, 10, 3, 0.0, 0.05) == 1.0  # no warmdown
    assert lr_multiplier(0, 10, 0, 0.5, 0.0) == 1.0  # no warmup
    assert lr_multiplier(10, 10, 0, 0.5, 0.0) == 0.0


def test_muon_momentum_and_weight_decay():
    m = lambda it: muon_momentum(it, 1000, 0.5, RECIPES["default"])  # warmdown = steps 500..1000
    assert m(0) == pytest.approx(0.85)
    assert m(200) == pytest.approx(0.91)
    assert m(400) == m(499) == 0.97
    assert m(500) == pytest.approx(0.97)
    assert m(750) == pytest.approx(0.935)
    assert m(1000) == pytest.approx(0.90)
    assert muon_weight_decay(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert muon_weight_decay(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert muon_weight_decay(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert muon_weight_decay(100, 100, 0.2, "cosine") == pytest.approx(0.0)


def test_loss_ema_is_debiased():
    loop = LoopState()
    assert loop.update_loss(0, 2.0) == pytest.approx(2.0)  # 0.1 * 2 / (1 - 0.9)
    # 0.9 * 0.2 + 0.1 * 4 = 0.58, debiased by 1 - 0.81 = 0.19
    assert loop.update_loss(1, 4.0) == pytest.approx(0.58 / 0.19)
    assert loop.smooth_loss == pytest.approx(0.58)


def test_clock_leaves_out_global_steps_0_to_10_once():
    assert UNTIMED_STEPS == 10
    whole = LoopState()
    for step in range(30):
        whole.count_time(step, 1.0)
    assert whole.total_training_time == 19.0  # steps 11..29
    # the same run in three segments (killed after steps 4 and 17): the same 19 steps
    split = LoopState()
    for segment in (range(0, 5), range(5, 18), range(18, 30)):
        for step in segment:
            split.count_time(step, 1.0)
    assert split.total_training_time == 19.0


def test_mfu():
    # 1e9 FLOPs/token x 524,288 tokens in 0.5 s on 8 GPUs of 989e12: 1.048576e15 / 7.912e15
    assert model_flops_utilization(1e9, 524_288, 0.5, 989e12, 8) == pytest.approx(100 * 1.048576e15 / 7.912e15)
    assert model_flops_utilization(1e9, 524_288, 0.5, None, 1) is None  # unknown peak: n/a, not 0


def save(folder, step):
    ckpt.save_checkpoint(folder, step, {"w": torch.zeros(1)}, {}, {"step": step}, rank=0)


def test_a_fresh_run_never_deletes_checkpoints_unasked(tmp_path):
    folder = tmp_path / "d2"
    assert pick_resume_step(folder, resume=False, resume_from_step=-1, overwrite=False) is None  # nothing there
    save(folder, 5)
    save(folder, 10)
    with pytest.raises(PicochatError, match=r"already has checkpoints \(steps 5, 10\): pass --resume .*--overwrite"):
        pick_resume_step(folder, resume=False, resume_from_step=-1, overwrite=False)
    assert ckpt.complete_steps(folder) == [5, 10]  # untouched
    assert pick_resume_step(folder, resume=True, resume_from_step=-1, overwrite=False) == 10
    assert pick_resume_step(folder, resume=False, resume_from_step=5, overwrite=False) == 5
    with pytest.raises(PicochatError, match=r"no complete checkpoint at step 7 .*\(saved: 5, 10\)"):
        pick_resume_step(folder, resume=False, resume_from_step=7, overwrite=False)
    assert pick_resume_step(folder, resume=False, resume_from_step=-1, overwrite=True) is None
    assert ckpt.complete_steps(folder) == []


def test_changed_flags():
    saved = {"matrix_lr": 0.02, "warmdown_ratio": 0.65, "eval_every": 250, "seed": 42, "dropped_flag": 1}
    now = {"matrix_lr": 0.03, "warmdown_ratio": 0.65, "eval_every": 100, "seed": 42, "overwrite": False}
    # eval_every is free; dropped_flag is gone from the config and overwrite is new: neither shapes the run
    assert changed_flags(saved, now, free={"eval_every"}) == ["--matrix-lr 0.02 -> 0.03"]
    assert changed_flags(saved, saved, free=set()) == []


def test_metrics_log_keeps_what_came_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_bpb": 3.0}, {"step": 0, "loss": 7.0}, {"step": 1, "loss": 6.0},
             {"step": 2, "val_bpb": 2.5}, {"step": 2, "loss": 5.0}, {"step": 3, "loss": 4.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')  # cut short by a kill
    log = MetricsLog(path, enabled=True, resume_step=2, evals_done=True)
    log.write({"step": 2, "loss": 5.5})
    log.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:4] + [{"step": 2, "loss": 5.5}]
    MetricsLog(path, enabled=True, resume_step=2, evals_done=False).close()  # step 2's evals rerun
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    MetricsLog(path, enabled=True, resume_step=None, evals_done=False).close()  # a fresh run
    assert path.read_text() == ""


def test_token_weighted_loss_survives_an_all_masked_micro_batch():
    """Two micro-batches, the second with every target masked: the loss is the mean over the 5
    unmasked targets of the whole batch (by hand), the gradients are that mean's, nothing is NaN,
    whereas a mean per micro-batch divides 0 by 0."""
    from picochat.gpt import GPTConfig, build_model
    from picochat.training import token_weighted_backward

    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=8, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                        "cpu", torch.float32)
    x1, x2 = torch.randint(0, 64, (2, 1, 4))
    y1 = torch.tensor([[5, -1, 7, 9]])
    y2 = torch.full((1, 4), -1)
    y1b = torch.tensor([[3, 3, -1, -1]])  # a second row of the first kind, so rows differ in count
    x1b = torch.randint(0, 64, (1, 4))
    loss = token_weighted_backward(model, [(torch.cat([x1, x1b]), torch.cat([y1, y1b])), (x2, y2)], None,
                                   ddp=False, world_size=1)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(torch.cat([x1, x1b]))
    targets = torch.cat([y1, y1b])
    by_hand = torch.nn.functional.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-1,
                                                reduction="sum") / 5
    by_hand.backward()
    assert math.isfinite(loss) and loss == pytest.approx(by_hand.item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert math.isnan(model(x2, y2).item())  # the per-micro-batch mean of the all-masked one
