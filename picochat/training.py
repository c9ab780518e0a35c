"""What every training stage shares (base-train now; chat-sft and chat-rl next): gradient
accumulation, the lr / Muon schedules, the optimizer step, the loop state that a checkpoint
carries for exact resume, the checks a resume must pass, the metrics log, stop signals, wandb,
MFU and the leaderboard clock.

Resume is exact: a checkpoint holds the model, every rank's optimizer shard, the data loader's
state and the batch it had already drawn, RNG states and the LoopState, so on CPU in fp32 a
resumed run reproduces an uninterrupted one bit for bit (same world size).
"""

import contextlib
import dataclasses
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
from picochat.common import PicochatError, print0
from picochat.recipes import Recipe

EMA_BETA = 0.9
UNTIMED_STEPS = 10  # global steps 0..10 (compile and warmup) stay off the leaderboard clock


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step; a one-line error listing the valid device batches otherwise."""
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


# ---------------------------------------------------------------------------
# One optimizer step


def optimizer_step(optimizer, scaler, ddp: bool):
    """Step (fp16: unscale first, and every rank skips or takes the step together), then zero the grads."""
    if scaler is not None:
        scaler.unscale_(optimizer)
        if ddp:
            for found_inf in scaler._found_inf_per_device(optimizer).values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def backward(loss, scaler):
    (scaler.scale(loss) if scaler is not None else loss).backward()


def token_weighted_backward(model, micro_batches, scaler, ddp: bool, world_size: int) -> float:
    """Backward of the mean loss over every unmasked target (>= 0) of the whole accumulated batch,
    all ranks together, however the targets are spread over micro-batches and ranks; returns this
    rank's mean loss. A micro-batch whose targets are all masked adds nothing (a per-micro-batch
    mean, the reference's way, makes it 0/0 = NaN)."""
    count = sum((y >= 0).sum() for _, y in micro_batches)
    total = count.clone()
    if ddp:
        dist.all_reduce(total)
    scale = world_size / total.clamp(min=1)  # the optimizer averages the ranks' gradients
    loss_sum = 0.0
    for x, y in micro_batches:
        loss = model(x, y, loss_reduction="sum")
        backward(loss * scale, scaler)
        loss_sum = loss_sum + loss.detach()
    return (loss_sum / count.clamp(min=1)).item()


def make_scaler(device: torch.device, dtype: torch.dtype):
    """fp16 needs loss scaling; bf16 and fp32 have the range without it."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def model_flops_utilization(flops_per_token: float, tokens: int, dt: float, peak_flops: float | None,
                            world_size: int) -> float | None:
    """Percent of the devices' peak FLOP/s that `tokens` trained in `dt` seconds used; None when the
    peak is unknown (printed n/a, logged null)."""
    if peak_flops is None:
        return None
    return 100 * flops_per_token * tokens / dt / (peak_flops * world_size)


def format_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{mfu:.2f}"


# ---------------------------------------------------------------------------
# Loop state: what the loop carries across steps, saved in every checkpoint


@dataclass
class LoopState:
    smooth_loss: float = 0.0  # EMA of the training loss, not yet debiased
    val_bpb: float | None = None
    min_val_bpb: float | None = None
    total_training_time: float = 0.0  # the leaderboard clock: training steps after global step UNTIMED_STEPS
    evals_done: bool = False  # the evals of the checkpoint's step ran before it was saved

    def update_loss(self, step: int, loss: float) -> float:
        """Fold the step's loss into the EMA and return the debiased EMA."""
        self.smooth_loss = EMA_BETA * self.smooth_loss + (1 - EMA_BETA) * loss
        return self.smooth_loss / (1 - EMA_BETA ** (step + 1))

    def count_time(self, step: int, dt: float):
        # by global step, so a resumed run leaves out the same steps as an uninterrupted one
        if step > UNTIMED_STEPS:
            self.total_training_time += dt

    def update_val_bpb(self, val_bpb: float):
        self.val_bpb = val_bpb
        self.min_val_bpb = min(val_bpb, self.min_val_bpb if self.min_val_bpb is not None else math.inf)


def save_training_checkpoint(ckpt_dir, step: int, model, optimizer, loader, batch, scaler, loop: LoopState,
                             meta: dict, rank: int, device):
    """Everything exact resume needs. `model` is the uncompiled model (rank 0 saves it); `batch` the
    (x, y) the loop already drew for this step; `meta` the stage's own run description."""
    loader_state = loader.state_dict()
    meta = {"step": step, **meta, "loop_state": dataclasses.asdict(loop), "dataloader_state": loader_state}
    rank_state = {"optimizer": optimizer.state_dict(), "loader": loader_state,
                  "batch": tuple(t.cpu() for t in batch), "rng": ckpt.get_rng_state(device),
                  "scaler": scaler.state_dict() if scaler is not None else None}
    ckpt.save_checkpoint(ckpt_dir, step, model.state_dict() if rank == 0 else None, rank_state, meta, rank)
    print0(f"saved checkpoint: {ckpt.meta_path(ckpt_dir, step)}")


def restore_training_state(rank_state: dict, meta: dict, optimizer, loader, scaler, device):
    """Load a rank's saved optimizer, loader, scaler and RNG states; returns (loop, batch)."""
    optimizer.load_state_dict(rank_state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(rank_state["scaler"])
    loader.load_state_dict(rank_state["loader"])
    ckpt.set_rng_state(rank_state["rng"], device)
    batch = tuple(t.to(device) for t in rank_state["batch"])
    return LoopState(**meta["loop_state"]), batch


# ---------------------------------------------------------------------------
# Which checkpoint to resume, and whether it may be resumed


def check_resume_flags(resume: bool, resume_from_step: int, overwrite: bool):
    """--resume, --resume-from-step and --overwrite contradict each other in pairs."""
    if resume and resume_from_step >= 0:
        raise PicochatError("pass either --resume (the latest checkpoint) or --resume-from-step, not both")
    if overwrite and (resume or resume_from_step >= 0):
        raise PicochatError("--overwrite starts over and --resume continues: pass one of them")


def pick_resume_step(ckpt_dir: Path, resume: bool, resume_from_step: int, overwrite: bool) -> int | None:
    """The step to resume from, or None to start fresh (after removing the tag's checkpoints only
    when --overwrite says so: forgetting --resume after a crash must not wipe the run)."""
    steps = ckpt.complete_steps(ckpt_dir)
    if resume_from_step >= 0:
        if resume_from_step not in steps:
            saved = ", ".join(map(str, steps)) or "none"
            raise PicochatError(f"no complete checkpoint at step {resume_from_step} in {ckpt_dir} (saved: {saved})")
        return resume_from_step
    if resume:
        if not steps:
            print0(f"--resume: no checkpoint in {ckpt_dir} yet, starting from scratch")
            return None
        return steps[-1]
    if steps and not overwrite:
        raise PicochatError(f"{ckpt_dir} already has checkpoints (steps {', '.join(map(str, steps))}): pass --resume "
                            "to continue that run, --overwrite to delete them and start over, or another --model-tag")
    if steps:
        removed = ckpt.remove_checkpoints(ckpt_dir)
        print0(f"--overwrite: removed the {removed} earlier checkpoint(s) in {ckpt_dir}")
    return None


def find_resume_step(ckpt_dir: Path, resume: bool, resume_from_step: int, overwrite: bool, rank: int,
                     ddp: bool) -> int | None:
    """pick_resume_step, decided by rank 0 for every rank: ranks on other nodes may not see its files,
    and must then stop rather than start over out of step."""
    decision = [None, None]  # step, error
    if rank == 0:
        try:
            decision[0] = pick_resume_step(ckpt_dir, resume, resume_from_step, overwrite)
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


def changed_flags(saved: dict, now: dict, free: set) -> list[str]:
    """'--flag saved -> now' for every setting both configs have that differs, except the `free` ones
    (cadences and logging, which cannot change the training trajectory). A setting only one side has
    comes from another picochat version (a flag added or removed), so there is nothing to compare."""
    return [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now))
            if k not in free and saved[k] != now[k]]


def check_resumable(meta: dict, where: str, model_config, user_config: dict, free_flags: set, world_size: int,
                    dtype: torch.dtype, tokenizer):
    """Refuse a resume whose model, flags, tokenizer, dtype or world size differ from the checkpoint's:
    any of them would change the run's trajectory half-way without saying so."""
    ckpt.check_same_config(meta["model_config"], model_config, where)
    ckpt.check_tokenizer(meta, tokenizer, where)
    diffs = changed_flags(meta["user_config"], user_config, free_flags)
    if diffs:
        raise PicochatError(f"{where} was trained with other settings ({'; '.join(diffs)}): resume with the "
                            "checkpoint's values, or start a new run under another --model-tag")
    saved_dtype = meta.get("compute_dtype", str(dtype))
    if saved_dtype != str(dtype):
        raise PicochatError(f"{where} was trained in {saved_dtype}, this run computes in {dtype}: resume with the "
                            f"same dtype (PICOCHAT_DTYPE={saved_dtype.removeprefix('torch.')})")
    if meta["world_size"] != world_size:
        raise PicochatError(f"{where} was saved by {meta['world_size']} process(es); resume it with the same "
                            f"number (this run has {world_size})")


# ---------------------------------------------------------------------------
# Outputs: metrics.jsonl, wandb, stop signals


class MetricsLog:
    """Appends JSON lines (rank 0 only). A fresh run starts the file over; a resumed run keeps
    only what was written before its checkpoint: training lines (those with a "loss") of earlier
    steps, and evaluation lines up to its step (of its own step only if those evals ran before
    the save)."""

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


def init_wandb(run_name: str, config: dict, master: bool):
    """A wandb run, or None for run name 'dummy', on other ranks, or without wandb installed."""
    if not master or run_name == "dummy":
        return None
    try:
        import wandb
    except ImportError:
        print0(f"wandb is not installed: run {run_name!r} is not logged to it (pip install wandb)")
        return None
    return wandb.init(project="picochat", name=run_name, config=config)


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
