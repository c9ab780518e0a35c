"""Supervised fine-tuning into a chat model: `picochat chat-sft` (one process, or one per GPU under
torchrun). Starts from a base checkpoint and saves to $PICOCHAT_HOME/sft_checkpoints/<tag>/.

Sizes and learning rates not given are inherited from the base run (its max_seq_len, device and
total batch, and its lr flags before base-train's batch-size scaling), as the reference does; the
lrs start at --init-lr-frac of those and follow a schedule over training progress (epochs of the
mixture, or steps with --num-iterations): flat, then linear to --final-lr-frac over the last
--warmdown-ratio. Muon momentum 0.85 -> 0.95 over 300 steps. With --load-optimizer the base run's
optimizer state (momentum buffers and group settings, e.g. its final weight decay) comes along.

The training mixture: SmolTalk, --mmlu-epochs x MMLU auxiliary_train, --gsm8k-epochs x GSM8K,
SpellingBee and SimpleSpelling, --identity conversations twice and --extra-jsonl conversations
once; shuffled together once (seed 42). The spelling tasks are the reference's mixture before
2026-07-03 (it dropped them to save lines; they teach the python tool), so an epoch here is about a
third longer than the current reference's; --spelling-bee 0 --simple-spelling 0 gives its mixture.
Validation: SmolTalk test, MMLU test[:5200], GSM8K test[:420]. Rows are packed by
sft_data.SFTLoader; the loss is the mean over every assistant token of the accumulated batch
(training.token_weighted_backward). The --identity and --extra-jsonl files are read first, then
every task's data is fetched (ChatCORE's too, when --chatcore-every is on), all before the model is
built.

ChatCORE during training (chat_eval): ARC-Easy, ARC-Challenge and MMLU on their first
--chatcore-max-cat problems, GSM8K and HumanEval on their first --chatcore-max-sample (greedy, up
to 512 new tokens), on the weights of that step; partial, and named so, whenever a cap left
problems out. Also the categorical three alone (the reference's ChatCORE_cat, logged under the
partial key chat_eval.chatcore gives it).

An epoch ends once every conversation of the mixture has been trained on (progress 1.0); the
reference stops one prefetched batch short of that.

Beyond the reference: exact resume (--resume, as base-train), a fresh run never deletes a tag's
checkpoints without --overwrite, and long conversations are truncated to a row, not dropped.

metrics.jsonl (in the checkpoint folder): training steps {"step", "loss", "lrm", "progress", "dt",
"tok_per_s", "bf16_mfu", "tokens"} (loss = the mean over rank 0's assistant tokens of the step, 0 if it
had none; tokens = rows x T trained on, padding included) and evaluations
{"step", "val_bpb"} and/or the ChatCORE score under its name's key (chat_eval.chatcore).
"""

import argparse
import dataclasses
import gc
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt
from picochat.chat_eval import CHATCORE_TASKS, build_task, chatcore, evaluate_task
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
from picochat.engine import Engine
from picochat.loss_eval import evaluate_bpb
from picochat.sft_data import SFTLoader
from picochat.tasks.common import TaskMixture
from picochat.tasks.customjson import CustomJSON
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.mmlu import MMLU
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spelling import SimpleSpelling, SpellingBee
from picochat.tokenizer import get_token_bytes
from picochat.training import (
    LoopState,
    MetricsLog,
    check_resumable,
    check_resume_flags,
    find_resume_step,
    format_mfu,
    grad_accum_steps,
    init_wandb,
    make_scaler,
    model_flops_utilization,
    optimizer_step,
    restore_training_state,
    save_training_checkpoint,
    stop_requested,
    stop_signals,
    token_weighted_backward,
)

MOMENTUM_WARMUP = 300  # steps of Muon momentum 0.85 -> 0.95


@dataclass
class SFTConfig:
    run: str = "dummy"  # wandb run name ("dummy" = no wandb)
    device_type: str = ""
    compile: str = "auto"
    model_tag: str | None = None  # the base checkpoint's tag (None: the latest)
    model_step: int | None = None  # its step (None: the last)
    output_tag: str | None = None  # this run's tag under sft_checkpoints (None: the base tag)
    load_optimizer: bool = True
    num_iterations: int = -1  # -1 = one epoch of the mixture
    max_seq_len: int | None = None  # None: inherited from the base run
    device_batch_size: int | None = None
    total_batch_size: int | None = None
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    matrix_lr: float | None = None
    init_lr_frac: float = 0.8
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    eval_every: int = 200
    eval_tokens: int = 40 * 524288
    chatcore_every: int = 200
    chatcore_max_cat: int = -1  # problems per categorical task (-1 = all)
    chatcore_max_sample: int = 24  # problems per generative task
    mmlu_epochs: int = 3
    gsm8k_epochs: int = 4
    spelling_bee: int = 80_000  # SpellingBee conversations (0 = none)
    simple_spelling: int = 200_000
    identity: str = ""  # JSONL of identity conversations (mixed in twice)
    extra_jsonl: str = ""  # JSONL of your own conversations (mixed in once)
    save_every: int = -1
    resume: bool = False
    resume_from_step: int = -1
    overwrite: bool = False


# Settings a resume may change: they cannot change the training trajectory
FREE_FLAGS = {"run", "device_type", "compile", "resume", "resume_from_step", "overwrite", "eval_every", "eval_tokens",
              "chatcore_every", "chatcore_max_cat", "chatcore_max_sample", "save_every", "output_tag"}
INHERITED = {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
             "embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}  # fallbacks, as the reference's


def own_conversations(c: SFTConfig) -> list:
    """The --identity (twice) and --extra-jsonl tasks. Read first, before anything is downloaded or
    --overwrite deletes a checkpoint, so a bad line fails at once."""
    tasks = []
    if c.identity:
        tasks += [CustomJSON(c.identity)] * 2
    if c.extra_jsonl:
        tasks.append(CustomJSON(c.extra_jsonl))
    return tasks


def train_mixture(c: SFTConfig, own: list):
    tasks = [SmolTalk(split="train"), *[MMLU(subset="auxiliary_train", split="train")] * c.mmlu_epochs,
             *[GSM8K(subset="main", split="train")] * c.gsm8k_epochs]
    if c.spelling_bee > 0:
        tasks.append(SpellingBee(size=c.spelling_bee, split="train"))
    if c.simple_spelling > 0:
        tasks.append(SimpleSpelling(size=c.simple_spelling, split="train"))
    return TaskMixture(tasks + own)


def val_mixture():
    return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                        GSM8K(subset="main", split="test", stop=420)])


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Over training progress in [0, 1]: linear warmup, flat, linear warmdown to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    left = max(0.0, (1 - progress) / warmdown_ratio)
    return left + (1 - left) * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_WARMUP, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def check_config(c: SFTConfig):
    check_resume_flags(c.resume, c.resume_from_step, c.overwrite)
    if c.compile not in ("auto", "on", "off"):
        raise PicochatError(f"--compile must be auto, on or off (got {c.compile!r})")
    if not 0 <= c.warmup_ratio <= 1 or not 0 < c.warmdown_ratio <= 1 or c.warmup_ratio + c.warmdown_ratio > 1:
        raise PicochatError("--warmup-ratio and --warmdown-ratio must lie in [0, 1] (warmdown > 0) and add up to "
                            "at most 1")
    if c.init_lr_frac <= 0:
        raise PicochatError(f"--init-lr-frac must be positive (got {c.init_lr_frac})")
    for name in ("chatcore_max_cat", "chatcore_max_sample"):
        if getattr(c, name) == 0 or getattr(c, name) < -1:
            raise PicochatError(f"--{name.replace('_', '-')} must be -1 (all) or at least 1 (got {getattr(c, name)})")
    for name in ("mmlu_epochs", "gsm8k_epochs", "spelling_bee", "simple_spelling"):
        if getattr(c, name) < 0:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 0 (got {getattr(c, name)})")
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(c, name)})")


def inherit(c: SFTConfig, base_meta: dict) -> SFTConfig:
    """Fill the flags left unset from the base run: sizes from its meta, lrs from the flags it was given."""
    values = {}
    for name, fallback in INHERITED.items():
        if getattr(c, name) is None:
            values[name] = base_meta.get(name, base_meta.get("user_config", {}).get(name)) or fallback
    return dataclasses.replace(c, **values)


@dataclass
class Run:
    c: SFTConfig
    rt: object
    tokenizer: object
    token_bytes: torch.Tensor
    model: torch.nn.Module  # compiled or not: trains
    orig_model: torch.nn.Module  # uncompiled: saved, evaluated
    optimizer: torch.optim.Optimizer
    scaler: object
    loader: SFTLoader
    val_data: object
    chatcore_tasks: dict | None  # name -> task, built before training (None: no ChatCORE)
    accum: int
    flops_per_token: float
    peak_flops: float | None
    ckpt_dir: object
    meta: dict


def setup(c: SFTConfig, rt):
    """Build the run; returns (run, resume_step, loop, batch)."""
    base_dir, base_step = ckpt.resolve_checkpoint("base", c.model_tag, c.model_step)
    base_meta = ckpt.load_meta(base_dir, base_step)
    c = inherit(c, base_meta)
    accum = grad_accum_steps(c.total_batch_size, c.device_batch_size, c.max_seq_len, rt.world_size)
    own = own_conversations(c)
    # downloads what is missing, before the model; the ChatCORE tasks too, rather than at its first
    # eval; and before --overwrite deletes anything, so a failed download leaves the old run whole
    train_data, val_data = train_mixture(c, own), val_mixture()
    chatcore_tasks = {name: build_task(name) for name in CHATCORE_TASKS} if c.chatcore_every > 0 else None
    tag = c.output_tag or base_dir.name
    ckpt_dir = ckpt.checkpoint_dir("sft", tag)
    resume_step = find_resume_step(ckpt_dir, c.resume, c.resume_from_step, c.overwrite, rt.rank, rt.ddp)

    model, tokenizer, _ = ckpt.load_model("base", rt.device, rt.dtype, base_dir.name, base_step)
    print0(model.attention_summary())
    if resume_step is not None:
        where = f"the checkpoint at step {resume_step} in {ckpt_dir}"
        saved_meta = ckpt.load_meta(ckpt_dir, resume_step)
        check_resumable(saved_meta, where, model.config, dataclasses.asdict(c), FREE_FLAGS, rt.world_size, rt.dtype,
                        tokenizer)
        ckpt.load_state_into(model, ckpt.load_model_state(ckpt_dir, resume_step, rt.device))
        print0(f"resuming from {where}")
    model.train()
    orig_model = model
    if c.compile == "on" or (c.compile == "auto" and rt.device.type == "cuda"):
        model = torch.compile(model, dynamic=False)
    optimizer = orig_model.setup_optimizer(unembedding_lr=c.unembedding_lr, embedding_lr=c.embedding_lr,
                                           matrix_lr=c.matrix_lr, weight_decay=0.0)
    if c.load_optimizer and resume_step is None:
        load_base_optimizer(optimizer, base_dir, base_step, base_meta, rt)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = group["initial_lr"] * c.init_lr_frac
    scaler = make_scaler(rt.device, rt.dtype)
    loader = SFTLoader(tokenizer, train_data, c.device_batch_size, c.max_seq_len, rt.device, rt.rank, rt.world_size)
    meta = {"val_bpb": None, "model_config": dataclasses.asdict(model.config), "user_config": dataclasses.asdict(c),
            "tokenizer": tokenizer.fingerprint(), "device_batch_size": c.device_batch_size,
            "max_seq_len": c.max_seq_len, "total_batch_size": c.total_batch_size, "world_size": rt.world_size,
            "compute_dtype": str(rt.dtype), "base_checkpoint": {"tag": base_dir.name, "step": base_step},
            "environment": environment(rt.device)}
    r = Run(c, rt, tokenizer, get_token_bytes(rt.device), model, orig_model, optimizer, scaler, loader, val_data,
            chatcore_tasks, accum, orig_model.estimate_flops(), get_peak_flops(device_name(rt.device)), ckpt_dir, meta)
    print0(f"SFT from base {base_dir.name} step {base_step} -> {ckpt_dir} | {len(train_data):,} training "
           f"conversations | batch {c.total_batch_size:,} tokens = {c.device_batch_size} x {c.max_seq_len} x "
           f"{rt.world_size} x {accum} | lrs x{c.init_lr_frac}: embedding {c.embedding_lr}, unembedding "
           f"{c.unembedding_lr}, matrix {c.matrix_lr}")
    if resume_step is None:
        return r, None, LoopState(), next(loader)
    rank_state = ckpt.load_optim_state(ckpt_dir, resume_step, rt.rank, rt.device)
    loop, batch = restore_training_state(rank_state, saved_meta, optimizer, loader, scaler, rt.device)
    return r, resume_step, loop, batch


def load_base_optimizer(optimizer, base_dir, base_step, base_meta, rt):
    """The base run's optimizer state for this rank (momentum buffers and group settings), keeping
    this run's lrs. A base run on another number of processes has other shards: start fresh then."""
    if base_meta.get("world_size") != rt.world_size:
        print0(f"--load-optimizer: the base run had {base_meta.get('world_size')} process(es), this one has "
               f"{rt.world_size}: starting with a fresh optimizer")
        return
    if not ckpt.optim_path(base_dir, base_step, rt.rank).exists():
        raise PicochatError(f"--load-optimizer 1: the base checkpoint at step {base_step} in {base_dir} has no "
                            f"optimizer state for rank {rt.rank} ({ckpt.optim_path(base_dir, base_step, rt.rank).name})"
                            ": pass --load-optimizer 0 to start with a fresh optimizer")
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt.load_optim_state(base_dir, base_step, rt.rank, rt.device)["optimizer"])
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = group["initial_lr"] = lr


def global_progress(loader: SFTLoader, rt) -> float:
    """The mixture epochs trained on (the batch the loop holds is not yet), the same number on every
    rank (the furthest rank's)."""
    progress = loader.progress_before_latest()
    if rt.ddp:
        t = torch.tensor(progress, dtype=torch.float64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        progress = t.item()
    return progress


def evaluate(r: Run, step: int, last: bool, loop: LoopState) -> dict:
    c, rt, record = r.c, r.rt, {}
    if c.eval_every > 0 and (last or step % c.eval_every == 0):
        val_loader = SFTLoader(r.tokenizer, r.val_data, c.device_batch_size, c.max_seq_len, rt.device, rt.rank,
                               rt.world_size)
        steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * rt.world_size))
        with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in validation"):
            record["val_bpb"] = evaluate_bpb(r.model, val_loader, steps, r.token_bytes)
        loop.update_val_bpb(record["val_bpb"])
        print0(f"step {step:05d} | validation bpb: {record['val_bpb']:.6f}")
    if c.chatcore_every > 0 and (last or (step > 0 and step % c.chatcore_every == 0)):
        r.orig_model.eval()
        engine = Engine(r.orig_model, r.tokenizer)
        results = {}
        for name, task in r.chatcore_tasks.items():
            cap = c.chatcore_max_cat if task.eval_type == "categorical" else c.chatcore_max_sample
            # categorical prompts go through in batches of the training's rows, as the reference does
            results[name] = evaluate_task(task, r.orig_model, r.tokenizer, engine, rt.device,
                                          batch_size=c.device_batch_size, max_problems=cap if cap > 0 else None)
        r.orig_model.train()
        # partial only where a cap actually left problems out (a cap above a task's size does not)
        capped = any(res["total"] < res["task_size"] for res in results.values())
        name, key, value = chatcore(results, capped)
        record[key] = value
        # the reference's ChatCORE_cat: the categorical tasks alone, named for what it is
        categorical = {n: res for n, res in results.items() if r.chatcore_tasks[n].eval_type == "categorical"}
        cat_name, cat_key, cat_value = chatcore(categorical, any(res["total"] < res["task_size"]
                                                                 for res in categorical.values()))
        record[cat_key] = cat_value
        print0(f"step {step:05d} | {name}: {value:.4f} | {cat_name}: {cat_value:.4f} | "
               + ", ".join(f"{task} {res['accuracy']:.4f}" for task, res in results.items()))
    return record


def train_step(r: Run, step: int, progress: float, batch):
    """One optimizer step over `accum` micro-batches; returns (loss, lrm, the next batch)."""
    c = r.c
    with out_of_memory_hint("--device-batch-size", c.device_batch_size, "in a training step",
                            "gradient accumulation keeps the total batch"):
        micro = [batch] + [next(r.loader) for _ in range(r.accum - 1)]
        loss = token_weighted_backward(r.model, micro, r.scaler, r.rt.ddp, r.rt.world_size)
        lrm = lr_multiplier(progress, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
        for group in r.optimizer.param_groups:  # weight decay stays what the optimizer holds
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        optimizer_step(r.optimizer, r.scaler, r.rt.ddp)
        return loss, lrm, next(r.loader)


def save(r: Run, step: int, loop: LoopState, batch, evals_done: bool):
    loop = dataclasses.replace(loop, evals_done=evals_done)
    save_training_checkpoint(r.ckpt_dir, step, r.orig_model, r.optimizer, r.loader, batch, r.scaler, loop,
                             r.meta | {"val_bpb": loop.val_bpb}, r.rt.rank, r.rt.device)


def run(c: SFTConfig) -> dict:
    check_config(c)
    rt = compute_init(c.device_type)
    try:
        with stop_signals() as stop:
            return train(c, rt, stop)
    finally:
        gc.unfreeze()
        gc.enable()
        compute_cleanup()


def train(c: SFTConfig, rt, stop) -> dict:
    print0(f"picochat chat-sft | {rt.world_size} process(es) | compute dtype: {rt.dtype} ({rt.dtype_reason})")
    r, resume_step, loop, batch = setup(c, rt)
    c = r.c
    tokens = c.total_batch_size
    wandb_run = init_wandb(c.run, dataclasses.asdict(c), rt.master)
    metrics = MetricsLog(r.ckpt_dir / "metrics.jsonl", rt.master, resume_step, loop.evals_done)
    step = first_step = resume_step or 0
    try:
        while True:
            progress = global_progress(r.loader, rt)
            last = step == c.num_iterations if c.num_iterations > 0 else progress >= 1.0
            if stop_requested(stop, rt.device, rt.ddp):
                if step != first_step:
                    save(r, step, loop, batch, evals_done=False)
                print0(f"stopped at step {step}; continue with --resume")
                raise KeyboardInterrupt(f"stopped at step {step}")
            if not (resume_step is not None and loop.evals_done and step == first_step):
                record = evaluate(r, step, last, loop)
                if record:
                    metrics.write({"step": step, **record})
                    if wandb_run is not None:
                        wandb_run.log({f"val/{k}": v for k, v in record.items()}, step=step)
            if step != first_step and (last or (c.save_every > 0 and step % c.save_every == 0)):
                save(r, step, loop, batch, evals_done=True)
            if last:
                break

            if c.num_iterations > 0:
                progress = step / c.num_iterations
            synchronize(rt.device)
            t0 = time.perf_counter()
            loss, lrm, batch = train_step(r, step, progress, batch)
            synchronize(rt.device)
            dt = time.perf_counter() - t0
            loop.count_time(step, dt)
            mfu = model_flops_utilization(r.flops_per_token, tokens, dt, r.peak_flops, rt.world_size)
            metrics.write({"step": step, "loss": loss, "lrm": lrm, "progress": progress, "dt": dt,
                           "tok_per_s": tokens / dt, "bf16_mfu": mfu, "tokens": tokens * (step + 1)})
            print0(f"step {step:05d} ({100 * min(progress, 1.0):.2f}%) | loss: {loss:.6f} | lrm: {lrm:.2f} | "
                   f"dt: {dt * 1000:.2f}ms | tok/sec: {tokens / dt:,.0f} | bf16 mfu: {format_mfu(mfu)} | "
                   f"{r.loader.position()}")
            if wandb_run is not None and step % 10 == 0:
                wandb_run.log({"train/loss": loss, "train/lrm": lrm, "train/dt": dt, "train/bf16_mfu": mfu}, step=step)
            # as in base-train: the collector's full passes over the long-lived objects are slow,
            # and after the first step little cyclic garbage is made (the evals make some)
            if step == first_step:
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % 5000 == 0:
                gc.collect()
            step += 1
    finally:
        metrics.close()
    min_bpb = loop.min_val_bpb if loop.min_val_bpb is not None else "n/a"
    print0(f"SFT done: {step} steps | minimum validation bpb: {min_bpb} | {r.ckpt_dir}")
    if wandb_run is not None:
        wandb_run.finish()
    return {"step": step, "val_bpb": loop.val_bpb, "min_val_bpb": loop.min_val_bpb, "checkpoint_dir": str(r.ckpt_dir)}


def main(argv=None):
    d = SFTConfig()
    p = argparse.ArgumentParser(prog="picochat chat-sft", formatter_class=HelpFormatter,
                                description="Fine-tune a base checkpoint into a chat model (flags left unset "
                                "inherit the base run's values).")
    g = p.add_argument_group("logging and runtime")
    g.add_argument("--run", default=d.run, help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu (if not given: autodetect)")
    g.add_argument("--compile", default=d.compile, choices=["auto", "on", "off"],
                   help="torch.compile the model (auto = on for CUDA)")
    g = p.add_argument_group("models")
    g.add_argument("--model-tag", default=d.model_tag, help="base checkpoint tag (if not given: the latest)")
    g.add_argument("--model-step", type=int, default=d.model_step, help="base checkpoint step (if not given: the last)")
    g.add_argument("--output-tag", default=d.output_tag, help="this run's tag (if not given: the base tag)")
    g.add_argument("--load-optimizer", type=int, choices=[0, 1], default=int(d.load_optimizer),
                   help="1 = start from the base run's optimizer state")
    g = p.add_argument_group("optimization (unset: inherited from the base run)")
    g.add_argument("--num-iterations", type=int, default=d.num_iterations, help="steps (-1 = one epoch of the mixture)")
    for name, kind in [("max_seq_len", int), ("device_batch_size", int), ("total_batch_size", int),
                       ("embedding_lr", float), ("unembedding_lr", float), ("matrix_lr", float)]:
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{name.replace('_', ' ')} (if not given: the base run's, else {INHERITED[name]})")
    g.add_argument("--init-lr-frac", type=float, default=d.init_lr_frac, help="the lrs start at this fraction")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of training in lr warmup")
    g.add_argument("--warmdown-ratio", type=float, default=d.warmdown_ratio,
                   help="fraction of training over which the lr decays at the end")
    g.add_argument("--final-lr-frac", type=float, default=d.final_lr_frac, help="lr multiplier at the end")
    g = p.add_argument_group("data")
    g.add_argument("--mmlu-epochs", type=int, default=d.mmlu_epochs, help="copies of MMLU auxiliary_train")
    g.add_argument("--gsm8k-epochs", type=int, default=d.gsm8k_epochs, help="copies of GSM8K train")
    g.add_argument("--spelling-bee", type=int, default=d.spelling_bee, help="SpellingBee conversations (0 = none)")
    g.add_argument("--simple-spelling", type=int, default=d.simple_spelling,
                   help="SimpleSpelling conversations (0 = none)")
    g.add_argument("--identity", default=d.identity,
                   help="JSONL file of identity conversations (who the model is), mixed in twice")
    g.add_argument("--extra-jsonl", default=d.extra_jsonl,
                   help="JSONL file of your own conversations (one per line: a list of {role, content} messages)")
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true", help="continue from this tag's latest SFT checkpoint (if any)")
    g.add_argument("--resume-from-step", type=int, default=d.resume_from_step,
                   help="continue from this tag's SFT checkpoint at this step (-1 = no)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete this tag's earlier SFT checkpoints and start over")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between val bpb evals (-1 = never)")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="validation tokens per eval")
    g.add_argument("--chatcore-every", type=int, default=d.chatcore_every,
                   help="steps between ChatCORE evals (-1 = never)")
    g.add_argument("--chatcore-max-cat", type=int, default=d.chatcore_max_cat,
                   help="problems per categorical ChatCORE task (-1 = all)")
    g.add_argument("--chatcore-max-sample", type=int, default=d.chatcore_max_sample,
                   help="problems per generative ChatCORE task (-1 = all)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (-1 = at the end)")
    args = vars(p.parse_args(argv))
    args["load_optimizer"] = bool(args["load_optimizer"])
    run(SFTConfig(**args))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
