"""Pretrain the base model: `picochat base-train` (one process, or one per GPU under torchrun).

Everything is derived from --depth: the model's width, the token budget (a fixed
ratio of tokens to scaling parameters), the batch size, the learning-rate scale and
the Muon weight decay (see plan_training). Each step runs gradient accumulation up
to the total batch, sets the scheduled lr / Muon momentum / Muon weight decay on the
optimizer's groups and steps. Along the way: validation bits per byte, the CORE
metric, greedy samples and checkpoints, each on its own cadence.

--preset picks a recipe from gpt.RECIPES, where all its values live. Besides the model it
sets the defaults of the lr, weight-decay, warmup and warmdown flags, the Muon momentum
schedule, the weight-decay schedule (cosine or linear to 0) and its scaling with depth,
and the Muon variant (Polar Express normalization, MuonEq, Muon+). "default" is the current
reference; "jan29" the 2026-01-29 leaderboard record, including its fixed 524,288-token batch
(the depth-derived batch came later). The run prints the schedules it uses.

Resume is exact: a checkpoint holds the model, every rank's optimizer shard, data
loader state, RNG states and the loop's own state, so on CPU in fp32 a resumed run
produces bit-identical losses to an uninterrupted one (same world size). Ctrl-C or
SIGTERM finishes the current step, saves a checkpoint and exits.

metrics.jsonl (in the run's checkpoint folder; rank 0 writes it, one JSON object a line):
  training step: {"step", "loss", "loss_ema", "lrm", "dt", "tok_per_s", "mfu", "tokens", "flops"}
      step      0-based index of the optimizer step; its loss is measured on the weights after `step` updates
      loss      the step's raw loss: mean over its micro-batches (rank 0's share of the batch)
      loss_ema  EMA of loss (beta 0.9), debiased
      lrm       learning-rate multiplier of the step
      dt        seconds the step took; tok_per_s = total batch tokens / dt
      mfu       model FLOPs utilization in percent (0 where the device's peak is unknown, e.g. CPU)
      tokens, flops   totals trained on so far, including this step
  evaluation: {"step", "val_bpb"} and/or "core" ("core_partial" over fewer than 22 tasks)
              (the weights after `step` updates)
A resumed run first drops the lines written after its checkpoint (training lines with
step >= the checkpoint's step, evaluation lines with a larger step), then appends.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt
from picochat.base_eval import sample_completions
from picochat.common import (
    PicochatError,
    compute_cleanup,
    compute_init,
    device_name,
    get_peak_flops,
    out_of_memory_hint,
    print0,
    synchronize,
)
from picochat.core_eval import BATCH_TOKENS, evaluate_core, load_bundle, load_tasks
from picochat.dataloader import DataLoader
from picochat.dataset import DEFAULT_DATASET, data_dir_for, split_files
from picochat.gpt import GPT, RECIPES, Recipe, build_model, config_from_depth
from picochat.loss_eval import evaluate_bpb
from picochat.tokenizer import get_token_bytes, get_tokenizer

B_REF = 2**19  # total batch (tokens) of the reference model, d12
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines: the optimal batch grows as tokens^0.383
EMA_BETA = 0.9
UNTIMED_STEPS = 10  # compile and warmup steps left out of the training time


@dataclass
class TrainConfig:
    run: str = "dummy"
    device_type: str = ""
    fp8: bool = False
    # model
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    preset: str = "default"
    # horizon, in order of precedence
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 12.0
    # optimization
    device_batch_size: int = 32
    total_batch_size: int | None = None  # None = the preset's value; -1 = derive from the model size
    # None = the preset's value (RECIPES[preset].train_defaults)
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    weight_decay: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    warmup_steps: int | None = None
    warmdown_ratio: float | None = None
    final_lr_frac: float | None = None
    # resume
    resume: bool = False
    resume_from_step: int = -1
    # evaluation and checkpoints
    eval_every: int = 250
    eval_tokens: int = 80 * 524288
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    core_batch_tokens: int = BATCH_TOKENS
    sample_every: int = 2000
    save_every: int = -1
    # output, data, runtime
    model_tag: str | None = None
    dataset: str = DEFAULT_DATASET
    compile: str = "auto"
    seed: int = 42


# ---------------------------------------------------------------------------
# Hyperparameters from the model size


@dataclass
class Plan:
    scaling_params: int  # transformer matrices + lm_head: what the token budget is proportional to
    target_tokens: int  # ratio * scaling_params
    total_batch_size: int  # tokens per optimizer step
    lr_scale: float  # multiplies every lr (AdamW groups and Muon)
    weight_decay: float  # Muon weight decay at step 0 (then to 0 by the preset's wd_schedule)
    num_iterations: int
    horizon: str  # which flag decided num_iterations


def scaling_params(model: GPT) -> int:
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def reference_scaling_params(c: TrainConfig, vocab_size: int) -> int:
    """Scaling parameters of the d12 model with the same vocab and shape settings (built on meta: no memory)."""
    config = config_from_depth(REF_DEPTH, vocab_size, c.max_seq_len, c.aspect_ratio, c.head_dim, c.window_pattern,
                               c.preset)
    with torch.device("meta"):
        return scaling_params(GPT(config))


def plan_training(c: TrainConfig, n_params: int, n_ref_params: int, flops_per_token: float) -> Plan:
    """Batch size, lr scale, weight decay and horizon, all tied to the d12 reference so that
    every depth trains at the same tokens-per-parameter point:
      - batch: B = 2^round(log2(B_REF * (D/D_REF)^0.383)) unless --total-batch-size is given;
      - lr scale: sqrt(B/B_REF) (Adam-style square-root scaling);
      - Muon weight decay: wd * sqrt(B/B_REF) * D_REF/D, which keeps B/(lr*wd*D) constant (the
        preset's wd_scaling "t_epoch"), or wd * (12/depth)^2 ("depth_squared", the jan29 recipe);
      - iterations: --num-iterations, else --target-flops / (flops per token * B), else D // B."""
    target_tokens = int(c.target_param_data_ratio * n_params)
    ref_tokens = c.target_param_data_ratio * n_ref_params
    if c.total_batch_size > 0:
        batch = c.total_batch_size
    else:
        batch = 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** BATCH_EXPONENT))
    lr_scale = math.sqrt(batch / B_REF)
    wd_scaling = RECIPES[c.preset].wd_scaling
    if wd_scaling == "t_epoch":
        weight_decay = c.weight_decay * lr_scale * ref_tokens / target_tokens
    elif wd_scaling == "depth_squared":
        weight_decay = c.weight_decay * (REF_DEPTH / c.depth) ** 2
    else:
        raise ValueError(f"unknown wd_scaling {wd_scaling!r}")
    if c.num_iterations > 0:
        iterations, horizon = c.num_iterations, "--num-iterations"
    elif c.target_flops > 0:
        iterations, horizon = round(c.target_flops / (flops_per_token * batch)), "--target-flops"
    else:
        iterations, horizon = target_tokens // batch, "--target-param-data-ratio"
    if iterations < 1:
        raise PicochatError(f"{horizon} gives {iterations} training steps at a total batch of {batch:,} tokens: "
                            "ask for a longer run")
    return Plan(n_params, target_tokens, batch, lr_scale, weight_decay, iterations, horizon)


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size % per_pass == 0:
        return total_batch_size // per_pass
    rows = total_batch_size // (seq_len * world_size)
    if rows * seq_len * world_size != total_batch_size:
        raise PicochatError(f"total batch of {total_batch_size:,} tokens is not a multiple of max_seq_len x "
                            f"world size = {seq_len} x {world_size}: change --total-batch-size or --max-seq-len")
    valid = [b for b in range(1, rows + 1) if rows % b == 0]
    raise PicochatError(f"total batch of {total_batch_size:,} tokens is not a multiple of device batch x "
                        f"max_seq_len x world size = {device_batch_size} x {seq_len} x {world_size}; "
                        f"valid --device-batch-size values: {', '.join(map(str, valid))}")


# ---------------------------------------------------------------------------
# Schedules (it = step index, n = number of steps)


def warmdown_steps(n: int, warmdown_ratio: float) -> int:
    return round(warmdown_ratio * n)


def lr_multiplier(it: int, n: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac at step n."""
    warmdown = warmdown_steps(n, warmdown_ratio)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it: int, n: int, warmdown_ratio: float, recipe: Recipe) -> float:
    """Linear from the recipe's momentum_start to momentum_peak over its first momentum_warmup
    steps, then momentum_peak, then linear to momentum_final at step n over the lr warmdown."""
    r = recipe
    warmdown = warmdown_steps(n, warmdown_ratio)
    if it < r.momentum_warmup:
        return r.momentum_start + (r.momentum_peak - r.momentum_start) * it / r.momentum_warmup
    if warmdown > 0 and it >= n - warmdown:
        return r.momentum_peak + (r.momentum_final - r.momentum_peak) * (it - (n - warmdown)) / warmdown
    return r.momentum_peak


def muon_weight_decay(it: int, n: int, weight_decay: float, schedule: str) -> float:
    """From weight_decay at step 0 to 0 at step n: a half cosine ("cosine", default) or a
    straight line ("linear", jan29)."""
    if schedule == "cosine":
        return weight_decay * 0.5 * (1 + math.cos(math.pi * it / n))
    if schedule == "linear":
        return weight_decay * (1 - it / n)
    raise ValueError(f"unknown weight decay schedule {schedule!r}")


def apply_schedules(optimizer, lrm: float, momentum: float, weight_decay: float):
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = weight_decay


def model_flops_utilization(flops_per_token: float, total_batch_size: int, dt: float, peak_flops: float,
                            world_size: int) -> float:
    """Percent of the devices' peak bf16 FLOP/s that the step's model FLOPs used (0 for an unknown peak)."""
    return 100 * flops_per_token * total_batch_size / dt / (peak_flops * world_size)


# ---------------------------------------------------------------------------
# Outputs: metrics.jsonl, wandb, stop signals


class MetricsLog:
    """Appends JSON lines (rank 0 only). A fresh run starts the file over; a resumed run keeps
    only what was written before its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, evals_done: bool):
        self.file = None
        if not enabled:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    step = record["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # e.g. a line cut short by a kill
                if step < resume_step or (step == resume_step and "loss" not in record and evals_done):
                    kept.append(line + "\n")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def write(self, record: dict):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def init_wandb(c: TrainConfig, master: bool):
    if not master or c.run == "dummy":
        return None
    try:
        import wandb
    except ImportError:
        print0(f"wandb is not installed: run {c.run!r} is not logged to it (pip install wandb)")
        return None
    return wandb.init(project="picochat", name=c.run, config=dataclasses.asdict(c))


@contextlib.contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a request (a dict entry) that the loop honours at the next step
    boundary; a second Ctrl-C (more than 2 s after the first) interrupts at once."""
    stop = {"signal": None, "time": 0.0}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        # torchrun forwards the terminal's Ctrl-C, so each worker sees it twice in a row: only a
        # later second one means "quit now"
        if stop["signal"] is not None:
            if signum == signal.SIGINT and time.monotonic() - stop["time"] > 2:
                raise KeyboardInterrupt
            return
        stop["signal"], stop["time"] = signal.Signals(signum).name, time.monotonic()
        print0(f"\n{stop['signal']}: stopping after this step (a checkpoint is saved first; Ctrl-C again to quit now)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_requested(stop: dict, device, ddp: bool) -> bool:
    """Every rank must stop at the same step, whichever ranks saw the signal."""
    flag = stop["signal"] is not None
    if ddp:
        t = torch.tensor(int(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


# ---------------------------------------------------------------------------
# Training


def check_config(c: TrainConfig):
    if c.fp8:
        raise PicochatError("--fp8 is not supported yet (picochat trains in bf16/fp32)")
    if c.resume and c.resume_from_step >= 0:
        raise PicochatError("pass either --resume (the latest checkpoint) or --resume-from-step, not both")
    if c.compile not in ("auto", "on", "off"):
        raise PicochatError(f"--compile must be auto, on or off (got {c.compile!r})")
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "core_batch_tokens"):
        if getattr(c, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(c, name)})")
    if c.num_iterations <= 0 and c.target_flops <= 0 and c.target_param_data_ratio <= 0:
        raise PicochatError("no training horizon: give --num-iterations, --target-flops or a positive "
                            "--target-param-data-ratio")
    if not 0 <= c.warmdown_ratio <= 1:
        raise PicochatError(f"--warmdown-ratio must be within [0, 1] (got {c.warmdown_ratio})")
    if c.warmup_steps < 0:
        raise PicochatError(f"--warmup-steps must be at least 0 (got {c.warmup_steps})")


def core_task_labels() -> list[str]:
    """The CORE tasks the eval bundle has data for, found before training rather than at step 2000."""
    tasks = load_tasks(load_bundle())
    present = [t.label for t in tasks if t.path.is_file()]
    if not present:
        raise PicochatError("the eval bundle has no task data: CORE cannot run (--core-metric-every -1 skips it)")
    if len(present) < len(tasks):
        missing = sorted(t.label for t in tasks if not t.path.is_file())
        print0(f"warning: the eval bundle lacks {', '.join(missing)}: CORE during training is partial "
               f"({len(present)}/{len(tasks)} tasks)")
    return present


def pick_resume_step(c: TrainConfig, ckpt_dir: Path) -> int | None:
    steps = ckpt.complete_steps(ckpt_dir)
    if c.resume_from_step >= 0:
        if c.resume_from_step not in steps:
            saved = ", ".join(map(str, steps)) or "none"
            raise PicochatError(f"no complete checkpoint at step {c.resume_from_step} in {ckpt_dir} (saved: {saved})")
        return c.resume_from_step
    if c.resume:
        if not steps:
            print0(f"--resume: no checkpoint in {ckpt_dir} yet, starting from scratch")
            return None
        return steps[-1]
    return None


def find_resume_step(c: TrainConfig, ckpt_dir: Path, rank: int, ddp: bool) -> int | None:
    """The step to resume from (None: start fresh). Rank 0 decides for every rank: ranks on
    other nodes may not see its files, and must then stop rather than start over out of step."""
    decision = [None, None]  # step, error
    if rank == 0:
        try:
            decision[0] = pick_resume_step(c, ckpt_dir)
        except PicochatError as e:
            decision[1] = str(e)
    if ddp:
        dist.broadcast_object_list(decision, src=0)
    step, error = decision
    if error is not None:
        raise PicochatError(error)
    if step is not None and step not in ckpt.complete_steps(ckpt_dir):
        raise PicochatError(f"rank {rank} cannot see the checkpoint at step {step} in {ckpt_dir} that rank 0 resumes "
                            "from: resuming a multi-node run needs that folder on a file system all nodes share "
                            "(or a copy of it on every node)")
    return step


def check_resumable(meta: dict, model_config, c: TrainConfig, world_size: int, dtype: torch.dtype, where: str):
    ckpt.check_same_config(meta["model_config"], model_config, where)
    saved_dtype = meta.get("compute_dtype", str(dtype))
    if saved_dtype != str(dtype):
        raise PicochatError(f"{where} was trained in {saved_dtype}, this run computes in {dtype}: resume with the "
                            f"same dtype (PICOCHAT_DTYPE={saved_dtype.removeprefix('torch.')})")
    if meta["world_size"] != world_size:
        raise PicochatError(f"{where} was saved by {meta['world_size']} process(es); resume it with the same "
                            f"number (this run has {world_size})")
    if meta["device_batch_size"] != c.device_batch_size:
        raise PicochatError(f"{where} was trained with --device-batch-size {meta['device_batch_size']}; "
                            "resume with the same value")


def with_preset_defaults(c: TrainConfig) -> TrainConfig:
    """Fill the lr, weight-decay, warmup and warmdown flags left unset from the preset's values."""
    defaults = RECIPES[c.preset].train_defaults
    return dataclasses.replace(c, **{k: v for k, v in defaults.items() if getattr(c, k) is None})


def run(c: TrainConfig) -> dict:
    c = with_preset_defaults(c)
    check_config(c)
    rt = compute_init(c.device_type, seed=c.seed)
    try:
        with stop_signals() as stop:
            return train(c, rt, stop)
    finally:
        gc.unfreeze()
        gc.enable()
        compute_cleanup()


def train(c: TrainConfig, rt, stop) -> dict:
    device, master, world = rt.device, rt.master, rt.world_size
    print0(f"picochat base-train | depth {c.depth} | {world} process(es)")
    peak_flops = get_peak_flops(device_name(device))
    print0(f"device: {device_name(device)} | peak bf16 FLOP/s: {peak_flops:.4g}")
    print0(f"compute dtype: {rt.dtype} ({rt.dtype_reason})")
    wandb_run = init_wandb(c, master)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()
    data_dir = data_dir_for(c.dataset)
    for split in ("train", "val"):
        split_files(data_dir, split)  # fail now on missing data, not after building the model
    core_tasks = core_task_labels() if c.core_metric_every > 0 else None

    model_config = config_from_depth(c.depth, vocab_size, c.max_seq_len, c.aspect_ratio, c.head_dim,
                                     c.window_pattern, c.preset)
    tag = c.model_tag or f"d{c.depth}"
    ckpt_dir = ckpt.checkpoint_dir("base", tag)
    resume_step = find_resume_step(c, ckpt_dir, rt.rank, rt.ddp)
    if resume_step is not None:
        where = f"the checkpoint at step {resume_step} in {ckpt_dir}"
        meta = ckpt.load_meta(ckpt_dir, resume_step)
        check_resumable(meta, model_config, c, world, rt.dtype, where)
        resume_state = ckpt.load_optim_state(ckpt_dir, resume_step, rt.rank, device)
        print0(f"resuming from {where}")

    model = build_model(model_config, device, rt.dtype)
    if resume_step is not None:
        ckpt.load_state_into(model, ckpt.load_model_state(ckpt_dir, resume_step, device))
    orig_model = model  # uncompiled: saved, and used for CORE and samples
    use_compile = c.compile == "on" or (c.compile == "auto" and device.type == "cuda")
    if use_compile:
        model = torch.compile(model, dynamic=False)

    for name, count in orig_model.num_scaling_params().items():
        print0(f"  {name:<22} {count:>16,}")
    flops_per_token = orig_model.estimate_flops()
    plan = plan_training(c, scaling_params(orig_model), reference_scaling_params(c, vocab_size), flops_per_token)
    accum = grad_accum_steps(plan.total_batch_size, c.device_batch_size, c.max_seq_len, world)
    n, batch = plan.num_iterations, plan.total_batch_size
    if resume_step is not None and meta["total_batch_size"] != batch:
        raise PicochatError(f"{where} was trained with a total batch of {meta['total_batch_size']:,} tokens, this "
                            f"run would use {batch:,}: resume with --total-batch-size {meta['total_batch_size']}")
    print0(f"FLOPs per token: {flops_per_token:.4e} | scaling params: {plan.scaling_params:,} | "
           f"target tokens: {plan.target_tokens:,}")
    print0(f"total batch: {batch:,} tokens = {c.device_batch_size} x {c.max_seq_len} x {world} process(es) x "
           f"{accum} accumulation step(s) | lr scale: {plan.lr_scale:.4f} | Muon weight decay: {plan.weight_decay:.4g}")
    print0(f"steps: {n:,} (from {plan.horizon}) | tokens: {n * batch:,} ({n * batch / plan.scaling_params:.2f} per "
           f"scaling param) | total FLOPs: {flops_per_token * batch * n:.4e}")

    recipe = RECIPES[c.preset]
    print0(f"schedules ({c.preset}): lr warmup {c.warmup_steps} steps, warmdown over the last "
           f"{warmdown_steps(n, c.warmdown_ratio)} to {c.final_lr_frac} | Muon momentum {recipe.momentum_start} -> "
           f"{recipe.momentum_peak} over {recipe.momentum_warmup} steps -> {recipe.momentum_final} | Muon weight decay "
           f"{recipe.wd_schedule} to 0 | Polar Express normalization {recipe.polar_express_norm}, MuonEq "
           f"{'on' if recipe.muon_eq else 'off'}, Muon+ {'on' if recipe.muon_plus else 'off'}")
    s = plan.lr_scale
    optimizer = orig_model.setup_optimizer(unembedding_lr=c.unembedding_lr * s, embedding_lr=c.embedding_lr * s,
                                           matrix_lr=c.matrix_lr * s, weight_decay=plan.weight_decay,
                                           scalar_lr=c.scalar_lr * s)
    # fp16 needs loss scaling; bf16 and fp32 have the range without it
    scaler = torch.amp.GradScaler(device.type) if rt.dtype == torch.float16 else None
    train_loader = DataLoader(tokenizer, c.device_batch_size, c.max_seq_len, "train", data_dir, device,
                              rt.rank, world)

    if resume_step is None:
        if master and ckpt.complete_steps(ckpt_dir):
            removed = ckpt.remove_checkpoints(ckpt_dir)
            print0(f"starting {tag} over: removed its {removed} earlier checkpoint(s) (--resume continues instead)")
        step = 0
        loop = {"smooth_loss": 0.0, "val_bpb": None, "min_val_bpb": None, "total_training_time": 0.0,
                "evals_done": False}
        x, y = next(train_loader)  # the loop always holds the next batch: loading overlaps the device's work
    else:
        step = resume_step
        loop = meta["loop_state"]
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(resume_state["scaler"])
        train_loader.load_state_dict(resume_state["loader"])
        x, y = (t.to(device) for t in resume_state["batch"])
        ckpt.set_rng_state(resume_state["rng"], device)
        del resume_state
    metrics = MetricsLog(ckpt_dir / "metrics.jsonl", master, resume_step, loop["evals_done"])

    def save(evals_done: bool):
        loop_state = dict(loop, evals_done=evals_done)
        loader_state = train_loader.state_dict()
        meta = {"step": step, "val_bpb": loop["val_bpb"], "model_config": dataclasses.asdict(model_config),
                "user_config": dataclasses.asdict(c), "device_batch_size": c.device_batch_size,
                "max_seq_len": c.max_seq_len, "total_batch_size": batch, "num_iterations": n,
                "loop_state": loop_state, "dataloader_state": loader_state, "world_size": world,
                "preset": c.preset, "compute_dtype": str(rt.dtype)}
        rank_state = {"optimizer": optimizer.state_dict(), "loader": loader_state, "batch": (x.cpu(), y.cpu()),
                      "rng": ckpt.get_rng_state(device), "scaler": scaler.state_dict() if scaler else None}
        ckpt.save_checkpoint(ckpt_dir, step, orig_model.state_dict() if master else None, rank_state, meta, rt.rank)
        print0(f"saved checkpoint: {ckpt.meta_path(ckpt_dir, step)}")

    first_step = step
    skip_evals = resume_step is not None and loop["evals_done"]  # they ran before the checkpoint was saved
    segment_time, segment_steps = 0.0, 0  # this process's steps after its first, for the ETA
    try:
        while True:
            last_step = step == n
            if stop_requested(stop, device, rt.ddp):
                if step != first_step:
                    save(evals_done=False)
                print0(f"stopped at step {step}; continue with --resume")
                raise KeyboardInterrupt(f"stopped at step {step}")

            if not (skip_evals and step == first_step):
                record = {}
                if c.eval_every > 0 and (last_step or step % c.eval_every == 0):
                    val_loader = DataLoader(tokenizer, c.device_batch_size, c.max_seq_len, "val", data_dir, device,
                                            rt.rank, world)
                    eval_steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * world))
                    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in validation"):
                        val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
                    loop["val_bpb"] = val_bpb
                    loop["min_val_bpb"] = min(val_bpb, loop["min_val_bpb"] or math.inf)
                    record["val_bpb"] = val_bpb
                    print0(f"step {step:05d} | validation bpb: {val_bpb:.6f}")
                if c.core_metric_every > 0 and (last_step or (step > 0 and step % c.core_metric_every == 0)):
                    with out_of_memory_hint("--core-batch-tokens", c.core_batch_tokens, "in the CORE evaluation"):
                        results = evaluate_core(orig_model, tokenizer, device, max_per_task=c.core_metric_max_per_task,
                                                tasks=core_tasks, batch_tokens=c.core_batch_tokens)
                    # a subset of the 22 tasks is never logged as CORE
                    key = "core" if results["core"] is not None else "core_partial"
                    record[key] = results["metric"]
                    print0(f"step {step:05d} | {results['metric_name']}: {results['metric']:.4f}")
                if record:
                    metrics.write({"step": step, **record})
                    if wandb_run is not None:
                        wandb_run.log({f"val/{k}": v for k, v in record.items()} | {
                            "step": step, "total_training_flops": flops_per_token * batch * step,
                            "total_training_time": loop["total_training_time"]}, step=step)
                if master and c.sample_every > 0 and (last_step or (step > 0 and step % c.sample_every == 0)):
                    for prompt, completion in sample_completions(orig_model, tokenizer, device):
                        print0(f"{prompt!r} -> {completion!r}")
            if step != first_step and (last_step or (c.save_every > 0 and step % c.save_every == 0)):
                save(evals_done=True)
            if last_step:
                break

            synchronize(device)
            t0 = time.perf_counter()
            with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in a training step",
                                    "gradient accumulation keeps the total batch"):
                loss_sum = 0.0
                for _ in range(accum):
                    loss = model(x, y)
                    loss_sum = loss_sum + loss.detach()
                    loss = loss / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    x, y = next(train_loader)
                lrm = lr_multiplier(step, n, c.warmup_steps, c.warmdown_ratio, c.final_lr_frac)
                apply_schedules(optimizer, lrm, muon_momentum(step, n, c.warmdown_ratio, recipe),
                                muon_weight_decay(step, n, plan.weight_decay, recipe.wd_schedule))
                if scaler is not None:
                    scaler.unscale_(optimizer)
                    if rt.ddp:  # every rank must skip (or take) the step together
                        for found_inf in scaler._found_inf_per_device(optimizer).values():
                            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                model.zero_grad(set_to_none=True)
                train_loss = (loss_sum / accum).item()
            synchronize(device)
            dt = time.perf_counter() - t0

            loop["smooth_loss"] = EMA_BETA * loop["smooth_loss"] + (1 - EMA_BETA) * train_loss
            loss_ema = loop["smooth_loss"] / (1 - EMA_BETA ** (step + 1))
            if step - first_step > UNTIMED_STEPS:
                loop["total_training_time"] += dt
            if step > first_step:  # the first step compiles
                segment_time, segment_steps = segment_time + dt, segment_steps + 1
            tok_per_s = batch / dt
            mfu = model_flops_utilization(flops_per_token, batch, dt, peak_flops, world)
            eta = f"{segment_time / segment_steps * (n - step - 1) / 60:.1f}m" if segment_steps else "-"
            metrics.write({"step": step, "loss": train_loss, "loss_ema": loss_ema, "lrm": lrm, "dt": dt,
                           "tok_per_s": tok_per_s, "mfu": mfu, "tokens": batch * (step + 1),
                           "flops": flops_per_token * batch * (step + 1)})
            print0(f"step {step:05d}/{n:05d} ({100 * step / n:.2f}%) | loss: {loss_ema:.6f} | lrm: {lrm:.2f} | "
                   f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_s:,.0f} | mfu: {mfu:.2f} | {train_loader.position()} | "
                   f"total time: {loop['total_training_time'] / 60:.2f}m | eta: {eta}")
            if wandb_run is not None and step % 100 == 0:
                wandb_run.log({"step": step, "train/loss": loss_ema, "train/lrm": lrm, "train/dt": dt,
                               "train/tok_per_sec": tok_per_s, "train/mfu": mfu}, step=step)

            # The collector's full passes over the many long-lived objects cost ~0.5s each;
            # after the first step nothing cyclic needs freeing, so it only runs rarely.
            if step == first_step:
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % 5000 == 0:
                gc.collect()
            step += 1
    finally:
        metrics.close()

    if device.type == "cuda":
        print0(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB")
    print0(f"total training time: {loop['total_training_time'] / 60:.2f}m | minimum validation bpb: "
           f"{loop['min_val_bpb'] if loop['min_val_bpb'] is not None else 'n/a'}")
    if wandb_run is not None:
        wandb_run.finish()
    return {"step": step, "val_bpb": loop["val_bpb"], "min_val_bpb": loop["min_val_bpb"],
            "total_training_time": loop["total_training_time"], "checkpoint_dir": str(ckpt_dir)}


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="picochat base-train", description="Pretrain the base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("logging and runtime")
    g.add_argument("--run", default=d.run, help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu ('' = autodetect)")
    g.add_argument("--fp8", action="store_true", help="fp8 training (not supported yet: rejected)")
    g.add_argument("--compile", default=d.compile, choices=["auto", "on", "off"],
                   help="torch.compile the model (auto = on for CUDA)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (weight init; every rank uses the same)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=d.depth, help="number of transformer layers; sets everything else")
    g.add_argument("--aspect-ratio", type=int, default=d.aspect_ratio, help="model width = depth x aspect ratio")
    g.add_argument("--head-dim", type=int, default=d.head_dim, help="attention head dimension")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="context length in tokens")
    g.add_argument("--window-pattern", default=d.window_pattern,
                   help="per-layer attention windows, tiled over the layers (L = full context, S = short: a "
                   "quarter of it in the default preset); the last layer is always L")
    g.add_argument("--preset", default=d.preset, choices=list(RECIPES),
                   help="recipe (picochat/gpt.py RECIPES): architecture, init, optimizer constants, the "
                   "defaults of the lr, weight-decay, warmup and warmdown flags, the momentum and weight-decay "
                   "schedules and the Muon variant; jan29 = the 2026-01-29 record")
    g = p.add_argument_group("training horizon (the first one given wins)")
    g.add_argument("--num-iterations", type=int, default=d.num_iterations, help="number of steps (-1 = derive)")
    g.add_argument("--target-flops", type=float, default=d.target_flops, help="total training FLOPs (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=d.target_param_data_ratio,
                   help="training tokens per scaling parameter")
    def preset_default(name):
        values = ", ".join(f"{k} {v.train_defaults[name]}" for k, v in RECIPES.items())
        return f"; unset: the preset's value ({values})"

    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=d.device_batch_size, help="rows per forward pass")
    # flags whose default is the preset's (RECIPES[preset].train_defaults)
    for name, kind, help_ in [
        ("total_batch_size", int, "tokens per optimizer step, -1 = derive from the model size"),
        ("embedding_lr", float, "AdamW lr of the embeddings"),
        ("unembedding_lr", float, "AdamW lr of lm_head"),
        ("weight_decay", float, "Muon weight decay, before its scaling with depth"),
        ("matrix_lr", float, "Muon lr of the block matrices"),
        ("scalar_lr", float, "AdamW lr of the per-layer scalars"),
        ("warmup_steps", int, "steps of linear lr warmup"),
        ("warmdown_ratio", float, "fraction of the steps over which the lr decays at the end"),
        ("final_lr_frac", float, "lr multiplier at the last step"),
    ]:
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_ + preset_default(name))
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true", help="continue from this tag's latest checkpoint (if any)")
    g.add_argument("--resume-from-step", type=int, default=d.resume_from_step,
                   help="continue from this tag's checkpoint at this step (-1 = no)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between val bpb evals (-1 = never)")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per eval")
    g.add_argument("--core-metric-every", type=int, default=d.core_metric_every,
                   help="steps between CORE evals (-1 = never)")
    g.add_argument("--core-metric-max-per-task", type=int, default=d.core_metric_max_per_task,
                   help="examples per CORE task (-1 = all)")
    g.add_argument("--core-batch-tokens", type=int, default=d.core_batch_tokens,
                   help="CORE: padded tokens per forward pass (lower it if CORE runs out of memory)")
    g.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="steps between greedy samples (-1 = never)")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between checkpoints (-1 = only at the end)")
    g = p.add_argument_group("output and data")
    g.add_argument("--model-tag", default=d.model_tag, help="checkpoint folder name (default d<depth>)")
    g.add_argument("--dataset", default=d.dataset,
                   help="fineweb-edu, climbmix, or a folder of parquet files with a text column")
    run(TrainConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
