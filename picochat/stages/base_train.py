"""Pretrain the base model: `picochat base-train` (one process, or one per GPU under torchrun).

Everything is derived from --depth: the model's width, the token budget (a fixed
ratio of tokens to scaling parameters), the batch size, the learning-rate scale and
the Muon weight decay (see plan_training). Each step runs gradient accumulation up
to the total batch, sets the scheduled lr / Muon momentum / Muon weight decay on the
optimizer's groups and steps. Along the way: validation bits per byte, the CORE
metric, greedy samples and checkpoints, each on its own cadence.

--preset picks a recipe from picochat/recipes.py. Besides the model it sets the defaults of
the lr, weight-decay, warmup and warmdown flags, the Muon momentum and weight-decay schedules,
the weight decay's scaling with depth and the Muon variant. "default" is the current
reference; "jan29" a reconstruction of the 2026-01-29 leaderboard record (docs/jan29.md),
including its fixed 524,288-token batch. The run prints the schedules it uses.

--fp8 runs the attention, MLP and lm_head matmuls in fp8 (picochat/fp8.py), as the reference's
speedrun does; the evaluations run with it off.

Resume is exact (picochat/training.py): on CPU in fp32 a resumed run produces bit-identical
losses to an uninterrupted one (same world size). --resume refuses a checkpoint trained with
other settings that shape the run (model, lrs, schedule, batch, data, seed, tokenizer). Ctrl-C
or SIGTERM finishes the current step, saves a checkpoint and exits. A fresh run never deletes
a tag's checkpoints unless --overwrite says so.

metrics.jsonl (in the run's checkpoint folder; rank 0 writes it, one JSON object a line):
  training step: {"step", "loss", "loss_ema", "lrm", "dt", "tok_per_s", "bf16_mfu", "tokens", "flops"}
      step      0-based index of the optimizer step; its loss is measured on the weights after `step` updates
      loss      the step's raw loss: mean over its micro-batches (rank 0's share of the batch)
      loss_ema  EMA of loss (beta 0.9), debiased; the console prints this one
      lrm       learning-rate multiplier of the step
      dt        seconds the step took; tok_per_s = total batch tokens / dt
      bf16_mfu  model FLOPs utilization in percent of the devices' peak bf16 FLOP/s; null where the
                peak is unknown (CPU, an unlisted GPU: set PICOCHAT_PEAK_FLOPS)
      tokens, flops   totals trained on so far, including this step
  evaluation: {"step", "val_bpb"} and/or the CORE score under core_eval.core_metric_name's key:
              "core" only for all 22 tasks uncapped, else e.g. "core_partial_max500"
              (the weights after `step` updates)
A resumed run first drops the lines written after its checkpoint, then appends.
"""

import argparse
import dataclasses
import gc
import math
import time
from dataclasses import dataclass

import torch

from picochat import checkpoint as ckpt
from picochat import fp8
from picochat.cli import HelpFormatter
from picochat.common import (
    PicochatError,
    compute_cleanup,
    compute_init,
    device_name,
    environment,
    get_peak_flops,
    out_of_memory_hint,
    print0,
    synchronize,
)
from picochat.core_eval import BATCH_TOKENS, evaluate_core, load_bundle, load_tasks
from picochat.dataloader import DataLoader
from picochat.dataset import DEFAULT_DATASET, data_dir_for, split_files
from picochat.gpt import GPT, Linear, build_model, config_from_depth
from picochat.loss_eval import evaluate_bpb
from picochat.recipes import RECIPES
from picochat.sampling import sample_completions
from picochat.tokenizer import get_token_bytes, get_tokenizer
from picochat.training import (
    LoopState,
    MetricsLog,
    apply_schedules,
    backward,
    check_resumable,
    check_resume_flags,
    find_resume_step,
    format_mfu,
    grad_accum_steps,
    init_wandb,
    lr_multiplier,
    make_scaler,
    model_flops_utilization,
    muon_momentum,
    muon_weight_decay,
    optimizer_step,
    restore_training_state,
    save_training_checkpoint,
    stop_requested,
    stop_signals,
    warmdown_steps,
)

B_REF = 2**19  # total batch (tokens) of the reference model, d12
REF_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines: the optimal batch grows as tokens^0.383


@dataclass
class TrainConfig:
    run: str = "dummy"
    device_type: str = ""
    # model
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    preset: str = "default"
    fp8: bool = False
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
    overwrite: bool = False  # a fresh run may delete the tag's earlier checkpoints
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

# Settings that cannot change the training trajectory: a resume may change them
FREE_FLAGS = {"run", "device_type", "compile", "resume", "resume_from_step", "overwrite", "eval_every", "eval_tokens",
              "core_metric_every", "core_metric_max_per_task", "core_batch_tokens", "sample_every", "save_every",
              "model_tag"}


# ---------------------------------------------------------------------------
# Checks and setup


def check_config(c: TrainConfig):
    check_resume_flags(c.resume, c.resume_from_step, c.overwrite)
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
    if c.fp8 and (c.device_batch_size * c.max_seq_len) % 16:
        raise PicochatError(f"--fp8 needs --device-batch-size x --max-seq-len divisible by 16 (the fp8 GEMM's "
                            f"rule; got {c.device_batch_size} x {c.max_seq_len})")


def core_task_labels() -> list[str]:
    """The CORE tasks the eval bundle has data for, found before training rather than at step 2000."""
    try:
        tasks = load_tasks(load_bundle())
    except PicochatError as e:
        raise PicochatError(f"{e} (set PICOCHAT_EVAL_BUNDLE to a local copy of the bundle, or pass "
                            "--core-metric-every -1 to train without CORE)") from None
    present = [t.label for t in tasks if t.path.is_file()]
    if not present:
        raise PicochatError("the eval bundle has no task data: CORE cannot run (--core-metric-every -1 skips it)")
    if len(present) < len(tasks):
        missing = sorted(t.label for t in tasks if not t.path.is_file())
        print0(f"warning: the eval bundle lacks {', '.join(missing)}: CORE during training is partial "
               f"({len(present)}/{len(tasks)} tasks)")
    return present


def with_preset_defaults(c: TrainConfig) -> TrainConfig:
    """Fill the lr, weight-decay, warmup and warmdown flags left unset from the preset's values."""
    defaults = RECIPES[c.preset].train_defaults
    return dataclasses.replace(c, **{k: v for k, v in defaults.items() if getattr(c, k) is None})


@dataclass
class Run:
    """What the loop works with, built once by setup()."""
    c: TrainConfig
    rt: object  # common.Runtime
    tokenizer: object
    token_bytes: torch.Tensor
    data_dir: object
    model: torch.nn.Module  # compiled or not: trains
    orig_model: torch.nn.Module  # uncompiled: saved, and used for CORE and samples
    optimizer: torch.optim.Optimizer
    scaler: object  # GradScaler for fp16, else None
    loader: DataLoader
    plan: Plan
    accum: int
    flops_per_token: float
    peak_flops: float | None
    ckpt_dir: object
    core_tasks: list | None
    meta: dict  # what every checkpoint of this run records besides its step and loop state


def setup(c: TrainConfig, rt):
    """Build the run; returns (run, resume_step, loop, batch). Every flag and the resume target are
    checked before the eval bundle is fetched or the model built."""
    device, world = rt.device, rt.world_size
    if c.fp8:  # before --overwrite may remove anything
        fp8.check_supported(device)
    tokenizer = get_tokenizer()
    data_dir = data_dir_for(c.dataset)
    for split in ("train", "val"):
        split_files(data_dir, split)  # fail now on missing data, not after building the model

    model_config = config_from_depth(c.depth, tokenizer.get_vocab_size(), c.max_seq_len, c.aspect_ratio,
                                     c.head_dim, c.window_pattern, c.preset)
    with torch.device("meta"):  # sizes and FLOPs without memory
        shape = GPT(model_config)
    flops_per_token = shape.estimate_flops()
    plan = plan_training(c, scaling_params(shape), reference_scaling_params(c, tokenizer.get_vocab_size()),
                         flops_per_token)
    accum = grad_accum_steps(plan.total_batch_size, c.device_batch_size, c.max_seq_len, world)

    tag = c.model_tag or f"d{c.depth}"
    ckpt_dir = ckpt.checkpoint_dir("base", tag)
    resume_step = find_resume_step(ckpt_dir, c.resume, c.resume_from_step, c.overwrite, rt.rank, rt.ddp)
    if resume_step is not None:
        where = f"the checkpoint at step {resume_step} in {ckpt_dir}"
        saved_meta = ckpt.load_meta(ckpt_dir, resume_step)
        check_resumable(saved_meta, where, model_config, dataclasses.asdict(c), FREE_FLAGS, world, rt.dtype,
                        tokenizer)
    core_tasks = core_task_labels() if c.core_metric_every > 0 else None

    model = build_model(model_config, device, rt.dtype)
    print0(model.attention_summary())
    if resume_step is not None:
        ckpt.load_state_into(model, ckpt.load_model_state(ckpt_dir, resume_step, device))
        print0(f"resuming from {where}")
    if c.fp8:
        linears = [name for name, m in model.named_modules() if isinstance(m, Linear)]
        converted = fp8.convert(model)
        kept = [name for name in linears if name not in converted]
        print0(f"fp8 (tensorwise scaling) for {len(converted)} of {len(linears)} matmuls; in "
               f"{str(rt.dtype).removeprefix('torch.')}: {', '.join(kept) or 'none'} (smaller than "
               f"{fp8.MIN_SIDE} or not a multiple of 16), and every evaluation")
    orig_model = model
    if c.compile == "on" or (c.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model, dynamic=False)
    s = plan.lr_scale
    optimizer = orig_model.setup_optimizer(unembedding_lr=c.unembedding_lr * s, embedding_lr=c.embedding_lr * s,
                                           matrix_lr=c.matrix_lr * s, weight_decay=plan.weight_decay,
                                           scalar_lr=c.scalar_lr * s)
    scaler = make_scaler(device, rt.dtype)
    loader = DataLoader(tokenizer, c.device_batch_size, c.max_seq_len, "train", data_dir, device, rt.rank, world)
    meta = {"val_bpb": None, "model_config": dataclasses.asdict(model_config), "user_config": dataclasses.asdict(c),
            "tokenizer": tokenizer.fingerprint(), "device_batch_size": c.device_batch_size,
            "max_seq_len": c.max_seq_len, "total_batch_size": plan.total_batch_size,
            "num_iterations": plan.num_iterations, "world_size": world, "preset": c.preset,
            "compute_dtype": str(rt.dtype), "environment": environment(device)}
    r = Run(c, rt, tokenizer, get_token_bytes(device), data_dir, model, orig_model, optimizer, scaler, loader, plan,
            accum, flops_per_token, get_peak_flops(device_name(device)), ckpt_dir, core_tasks, meta)
    if resume_step is None:
        return r, None, LoopState(), next(loader)  # the loop always holds the next batch
    rank_state = ckpt.load_optim_state(ckpt_dir, resume_step, rt.rank, device)
    loop, batch = restore_training_state(rank_state, saved_meta, optimizer, loader, scaler, device)
    return r, resume_step, loop, batch


def describe(r: Run):
    c, plan, world = r.c, r.plan, r.rt.world_size
    n, batch, recipe = plan.num_iterations, plan.total_batch_size, RECIPES[c.preset]
    for name, count in r.orig_model.num_scaling_params().items():
        print0(f"  {name:<22} {count:>16,}")
    print0(f"FLOPs per token: {r.flops_per_token:.4e} | scaling params: {plan.scaling_params:,} | "
           f"target tokens: {plan.target_tokens:,}")
    print0(f"total batch: {batch:,} tokens = {c.device_batch_size} x {c.max_seq_len} x {world} process(es) x "
           f"{r.accum} accumulation step(s) | lr scale: {plan.lr_scale:.4f} | Muon weight decay: "
           f"{plan.weight_decay:.4g}")
    print0(f"steps: {n:,} (from {plan.horizon}) | tokens: {n * batch:,} ({n * batch / plan.scaling_params:.2f} per "
           f"scaling param) | total FLOPs: {r.flops_per_token * batch * n:.4e}")
    print0(f"schedules ({c.preset}): lr warmup {c.warmup_steps} steps, warmdown over the last "
           f"{warmdown_steps(n, c.warmdown_ratio)} to {c.final_lr_frac} | Muon momentum {recipe.momentum_start} -> "
           f"{recipe.momentum_peak} over {recipe.momentum_warmup} steps -> {recipe.momentum_final} | Muon weight decay "
           f"{recipe.wd_schedule} to 0 | Polar Express normalization {recipe.polar_express_norm}, MuonEq "
           f"{'on' if recipe.muon_eq else 'off'}, Muon+ {'on' if recipe.muon_plus else 'off'}")


# ---------------------------------------------------------------------------
# The loop's parts


def evaluate(r: Run, step: int, last: bool, loop: LoopState) -> dict:
    """The evals due at `step` (val bpb, CORE, samples); returns what goes into metrics.jsonl."""
    c, rt, record = r.c, r.rt, {}
    if c.eval_every > 0 and (last or step % c.eval_every == 0):
        val_loader = DataLoader(r.tokenizer, c.device_batch_size, c.max_seq_len, "val", r.data_dir, rt.device,
                                rt.rank, rt.world_size)
        eval_steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * rt.world_size))
        with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in validation"):
            record["val_bpb"] = evaluate_bpb(r.model, val_loader, eval_steps, r.token_bytes)
        loop.update_val_bpb(record["val_bpb"])
        print0(f"step {step:05d} | validation bpb: {record['val_bpb']:.6f}")
    if c.core_metric_every > 0 and (last or (step > 0 and step % c.core_metric_every == 0)):
        with out_of_memory_hint("--core-batch-tokens", c.core_batch_tokens, "in the CORE evaluation"):
            result = evaluate_core(r.orig_model, r.tokenizer, rt.device, max_per_task=c.core_metric_max_per_task,
                                   tasks=r.core_tasks, batch_tokens=c.core_batch_tokens)
        record[result["metric_key"]] = result["metric"]
        print0(f"step {step:05d} | {result['metric_name']}: {result['metric']:.4f}")
    if rt.master and c.sample_every > 0 and (last or (step > 0 and step % c.sample_every == 0)):
        for prompt, completion in sample_completions(r.orig_model, r.tokenizer):
            print0(f"{prompt!r} -> {completion!r}")
    return record


def train_step(r: Run, step: int, batch):
    """One optimizer step over `accum` micro-batches; returns (mean loss, the next batch)."""
    c, plan, recipe, n = r.c, r.plan, RECIPES[r.c.preset], r.plan.num_iterations
    x, y = batch
    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in a training step",
                            "gradient accumulation keeps the total batch"):
        loss_sum = 0.0
        for _ in range(r.accum):
            loss = r.model(x, y)
            loss_sum = loss_sum + loss.detach()
            backward(loss / r.accum, r.scaler)
            x, y = next(r.loader)
        lrm = lr_multiplier(step, n, c.warmup_steps, c.warmdown_ratio, c.final_lr_frac)
        apply_schedules(r.optimizer, lrm, muon_momentum(step, n, c.warmdown_ratio, recipe),
                        muon_weight_decay(step, n, plan.weight_decay, recipe.wd_schedule))
        optimizer_step(r.optimizer, r.scaler, r.rt.ddp)
        return (loss_sum / r.accum).item(), lrm, (x, y)


def save(r: Run, step: int, loop: LoopState, batch, evals_done: bool):
    loop = dataclasses.replace(loop, evals_done=evals_done)
    save_training_checkpoint(r.ckpt_dir, step, r.orig_model, r.optimizer, r.loader, batch, r.scaler, loop,
                             r.meta | {"val_bpb": loop.val_bpb}, r.rt.rank, r.rt.device)


# ---------------------------------------------------------------------------
# Training


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
    print0(f"picochat base-train | depth {c.depth} | {rt.world_size} process(es)")
    print0(f"compute dtype: {rt.dtype} ({rt.dtype_reason})")
    r, resume_step, loop, batch = setup(c, rt)
    peak = "unknown (bf16 MFU n/a; PICOCHAT_PEAK_FLOPS sets it)" if r.peak_flops is None else f"{r.peak_flops:.4g}"
    print0(f"device: {device_name(rt.device)} | peak bf16 FLOP/s: {peak}")
    describe(r)
    n, tokens = r.plan.num_iterations, r.plan.total_batch_size
    wandb_run = init_wandb(c.run, dataclasses.asdict(c), rt.master)
    metrics = MetricsLog(r.ckpt_dir / "metrics.jsonl", rt.master, resume_step, loop.evals_done)
    step = first_step = resume_step or 0
    segment_time, segment_steps = 0.0, 0  # this process's steps after its first, for the ETA
    try:
        while True:
            last = step == n
            if stop_requested(stop, rt.device, rt.ddp):
                if step != first_step:
                    save(r, step, loop, batch, evals_done=False)
                print0(f"stopped at step {step}; continue with --resume")
                raise KeyboardInterrupt(f"stopped at step {step}")
            if not (resume_step is not None and loop.evals_done and step == first_step):  # ran before the save
                with fp8.disabled(r.orig_model):
                    record = evaluate(r, step, last, loop)
                if record:
                    metrics.write({"step": step, **record})
                    if wandb_run is not None:
                        wandb_run.log({f"val/{k}": v for k, v in record.items()} | {
                            "step": step, "total_training_flops": r.flops_per_token * tokens * step,
                            "total_training_time": loop.total_training_time}, step=step)
            if step != first_step and (last or (c.save_every > 0 and step % c.save_every == 0)):
                save(r, step, loop, batch, evals_done=True)
            if last:
                break

            synchronize(rt.device)
            t0 = time.perf_counter()
            train_loss, lrm, batch = train_step(r, step, batch)
            synchronize(rt.device)
            dt = time.perf_counter() - t0

            loss_ema = loop.update_loss(step, train_loss)
            loop.count_time(step, dt)
            if step > first_step:  # the first step compiles
                segment_time, segment_steps = segment_time + dt, segment_steps + 1
            mfu = model_flops_utilization(r.flops_per_token, tokens, dt, r.peak_flops, rt.world_size)
            eta = f"{segment_time / segment_steps * (n - step - 1) / 60:.1f}m" if segment_steps else "-"
            metrics.write({"step": step, "loss": train_loss, "loss_ema": loss_ema, "lrm": lrm, "dt": dt,
                           "tok_per_s": tokens / dt, "bf16_mfu": mfu, "tokens": tokens * (step + 1),
                           "flops": r.flops_per_token * tokens * (step + 1)})
            print0(f"step {step:05d}/{n:05d} ({100 * step / n:.2f}%) | loss_ema: {loss_ema:.6f} | lrm: {lrm:.2f} | "
                   f"dt: {dt * 1000:.2f}ms | tok/sec: {tokens / dt:,.0f} | bf16 mfu: {format_mfu(mfu)} | "
                   f"{r.loader.position()} | total time: {loop.total_training_time / 60:.2f}m | eta: {eta}")
            if wandb_run is not None and step % 100 == 0:
                wandb_run.log({"step": step, "train/loss": train_loss, "train/loss_ema": loss_ema, "train/lrm": lrm,
                               "train/dt": dt, "train/tok_per_sec": tokens / dt, "train/bf16_mfu": mfu}, step=step)
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

    if rt.device.type == "cuda":
        print0(f"peak memory: {torch.cuda.max_memory_allocated(rt.device) / 2**20:,.0f} MiB")
    min_bpb = loop.min_val_bpb if loop.min_val_bpb is not None else "n/a"
    print0(f"total training time: {loop.total_training_time / 60:.2f}m | minimum validation bpb: {min_bpb}")
    if wandb_run is not None:
        wandb_run.finish()
    return {"step": step, "val_bpb": loop.val_bpb, "min_val_bpb": loop.min_val_bpb,
            "total_training_time": loop.total_training_time, "checkpoint_dir": str(r.ckpt_dir)}


# ---------------------------------------------------------------------------
# Command line


def main(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="picochat base-train", description="Pretrain the base model. Flags whose "
                                "value is not given here come from the --preset recipe (picochat/recipes.py).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("logging and runtime")
    g.add_argument("--run", default=d.run, help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu ('' = autodetect)")
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
                   help="recipe (picochat/recipes.py): architecture, init, optimizer constants, the "
                   "defaults of the lr, weight-decay, warmup and warmdown flags, the momentum and weight-decay "
                   "schedules and the Muon variant; jan29 = the 2026-01-29 record")
    g.add_argument("--fp8", action="store_true",
                   help="run the attention, MLP and lm_head matmuls in fp8 with tensorwise scaling (GPUs of compute "
                   "capability 8.9+, e.g. H100; emulated on the CPU, for testing). Evaluations stay in the "
                   "compute dtype, and MFU stays a fraction of the bf16 peak")
    g = p.add_argument_group("training horizon (the first one given wins)")
    g.add_argument("--num-iterations", type=int, default=d.num_iterations, help="number of steps (-1 = derive)")
    g.add_argument("--target-flops", type=float, default=d.target_flops, help="total training FLOPs (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=d.target_param_data_ratio,
                   help="training tokens per scaling parameter")
    def preset_default(name):
        values = ", ".join(f"{v.train_defaults[name]} with --preset {k}" for k, v in RECIPES.items())
        return f" (if not given: {values})"

    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=d.device_batch_size, help="rows per forward pass")
    # flags whose default is the preset's (RECIPES[preset].train_defaults)
    for name, kind, help_ in [
        ("total_batch_size", int, "tokens per optimizer step; -1 = derive from the model size"),
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
    g.add_argument("--overwrite", action="store_true",
                   help="delete this tag's earlier checkpoints and start over (without it, a fresh run refuses "
                        "a tag that has checkpoints)")
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
