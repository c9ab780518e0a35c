"""The prepared check for a briefly lent GPU (1x H100/H200): run it first. It is done in 8 minutes.

    HF_HUB_OFFLINE=1 python bench/gpu_check.py      # on the GPU: <= 8 min (--deadline-s 480)
    python bench/gpu_check.py --smoke               # the same code paths on the CPU, tiny shapes: < 1 min

On a lent GPU whose image lacks some of picochat's dependencies, and where picochat is not installed,
bench/device_wheels.sh (run here) and bench/gpu_run.sh (run there) wrap this script.

The 480 s count from the start of main, after the imports (a few seconds). Where the files a remote
run writes do not come back by themselves, point --results into the folder that does, and append
that block to bench/RESULTS.md afterwards (the last stdout line, JSON, holds the same results).

Sections:
1. training throughput: tok/s and bf16 MFU of full training steps (forward, backward, MuonAdamW
   step), torch.compile'd, T=2048, for d12 and d24 at the largest device batch that fits
   (32, 16, 8, ...), once with FA3, once with what picochat runs where FA3 does not load
   (FlexAttention for the sliding windows, SDPA for full context), and once with base-train
   --fp8 (picochat's own attention choice, FA3 where it loads), whose last loss must be finite
2. attention fwd+bwd: each backend (fa3, flex, sdpa) alone at T=2048, for the two windows of the
   SSSL pattern
3. loss falls: d12 training steps on one fixed, learnable batch; the loss must end below ln 256
4. KV-cache decode (bench_engine.py): prefill tok/s and time to first token at contexts 128 and
   1024, decode tok/s at batch 1/8/32 against full recomputation, and batch 1 against the
   bandwidth roofline (weight + KV bytes per step over peak memory bandwidth), for d12 and d24
5. 2-GPU NCCL step: two data-parallel steps of picochat's sharded MuonAdamW in 2 processes; every
   parameter must move and end identical on both ranks
6. SFT step: chat-sft's step at d12 (token-weighted loss over 2 micro-batches whose targets are
   half masked, then the optimizer step), compiled, at the batch section 1 found to fit (the
   smallest batch when section 1 did not run)
7. chat-web streams (bench_serve.py): time to first token and tokens/s per stream at 1, 8 and 32
   concurrent streaming requests to the real app over HTTP, one worker, d12 with random weights
   and a 1,024-token tokenizer trained on the spot
8. RL step (bench_rl.py): chat-rl's step at d12 with random weights: rollouts of 2 prompts x 16
   samples (batches of 8, up to 256 new tokens), the policy-gradient backward and the optimizer
   step; rollout tok/s and the time of each part

What cannot run here says "skipped: <why>" (FA3 that does not load, a single GPU). One deadline
covers the run: an item not started by then is "skipped: deadline", one still running is stopped
there ("killed: deadline") and the results so far are written. The cheap items and d12 run
first, d24 last. Results are printed as they come, appended as a dated block to bench/RESULTS.md
(--results; a smoke run writes to $PICOCHAT_HOME instead) and summed up in one JSON line, the
last line of stdout. Exit status 1 when a check failed or an item raised.

FA3 comes from the Hugging Face kernel hub; without internet it loads only from the local cache,
and HF_HUB_OFFLINE=1 makes a miss fail at once instead of after network timeouts.
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_chat  # bench/ is on sys.path when this file runs as a script
import bench_engine
import bench_rl
import bench_serve
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat import attention, fp8
from picochat.cli import HelpFormatter
from picochat.common import (
    PicochatError,
    compute_cleanup,
    compute_init,
    device_name,
    get_base_dir,
    get_peak_flops,
    synchronize,
)
from picochat.engine import Engine
from picochat.gpt import build_model, config_from_depth, window_sizes
from picochat.training import (
    backward,
    format_mfu,
    make_scaler,
    model_flops_utilization,
    optimizer_step,
    token_weighted_backward,
)

REPO = Path(__file__).resolve().parent.parent

SECTIONS = {
    "throughput": "1. training throughput",
    "attention": "2. attention fwd+bwd",
    "loss": "3. loss falls",
    "kv_decode": "4. KV-cache decode",
    "nccl": "5. 2-GPU NCCL step",
    "sft": "6. SFT step",
    "serve": "7. chat-web streams",
    "rl": "8. RL step",
}
# Training throughput runs under each; "flex/sdpa" is picochat's own choice with FA3 out of the way,
# "fp8" base-train --fp8 with the attention picochat picks
SETTINGS = ("fa3", "flex/sdpa", "fp8")
LEARNABLE_TOKENS = 256  # the training batches cycle through this many tokens (see fixed_batch)


@dataclass(frozen=True)
class Sizes:
    depths: tuple  # training throughput; the first depth also runs the loss check
    seq_len: int
    vocab_size: int
    head_dim: int
    batches: tuple  # device batch sizes to try, largest first
    warmup: int  # untimed steps or calls first (compilation)
    steps: int  # timed steps or calls
    loss_steps: int
    attention_batch: int
    compile: bool
    decode_contexts: tuple
    decode_batches: tuple
    decode_steps: int
    serve_streams: tuple
    serve_tokens: int
    rl: tuple  # (examples, samples per example, device batch, max new tokens, timed steps)


GPU = Sizes(depths=(12, 24), seq_len=2048, vocab_size=32768, head_dim=128, batches=(32, 16, 8, 4, 2, 1), warmup=3,
            steps=10, loss_steps=30, attention_batch=16, compile=True, decode_contexts=(128, 1024),
            decode_batches=(1, 8, 32), decode_steps=32, serve_streams=(1, 8, 32), serve_tokens=64,
            rl=(2, 16, 8, 256, 2))
# The model runs eager here: compiling even a depth-2 GPT takes ~50 s on 2 cold CPU cores, on top
# of the ~25 s that MuonAdamW's kernels (compiled always) take. At T=256 the S window (128: windows
# come in multiples of 128) is shorter than the context, so the windowed attention paths run too.
SMOKE = Sizes(depths=(2,), seq_len=256, vocab_size=512, head_dim=64, batches=(4, 2), warmup=1, steps=2,
              loss_steps=15, attention_batch=2, compile=False, decode_contexts=(16, 64), decode_batches=(1, 2),
              decode_steps=3, serve_streams=(1, 2), serve_tokens=4, rl=(1, 2, 2, 4, 1))


def skipped(why: str) -> dict:
    return {"status": f"skipped: {why}"}


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fa3_unavailable(dtype) -> str | None:
    """Why FA3 cannot run here, or None."""
    if attention.load_fa3() is None:
        return attention.fa3_status()
    if dtype != torch.bfloat16:
        return f"FA3 runs in bf16 only, this run computes in {str(dtype).removeprefix('torch.')}"
    return None


@contextlib.contextmanager
def attention_setting(setting: str):
    """fa3: FA3 on every layer. flex/sdpa: the backends attention.py picks where FA3 does not load
    (FlexAttention for sliding windows on CUDA, SDPA for full context and on the CPU). No single
    forced backend gives that mix, so FA3 is hidden instead: backend_name looks load_fa3 up on
    every call. fp8: whatever picochat picks."""
    if setting == "fp8":
        yield
        return
    if setting == "fa3":
        attention.force_backend("fa3")
        try:
            yield
        finally:
            attention.force_backend(None)
        return
    real_load_fa3 = attention.load_fa3
    attention.load_fa3 = lambda: None
    try:
        yield
    finally:
        attention.load_fa3 = real_load_fa3


def fixed_batch(batch: int, sizes: Sizes, device, seed: int = 0):
    """(inputs, targets): rows that walk one fixed random cycle through LEARNABLE_TOKENS tokens of
    the vocabulary, each row from its own start. Every token has one successor, so the batch is
    learnable; a model that learned only which tokens occur, not which follows which, has loss
    ln LEARNABLE_TOKENS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(sizes.vocab_size, generator=g)[:LEARNABLE_TOKENS]
    start = torch.randint(0, LEARNABLE_TOKENS, (batch, 1), generator=g)
    rows = tokens[(start + torch.arange(sizes.seq_len + 1)) % LEARNABLE_TOKENS].to(device)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def seconds_per_call(fn, calls: int, device) -> float:
    """Wall time per call with the device's queued work included, as bench_train times steps."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The checks. Each returns a dict: "status" (ok, pass, fail, skipped: why), for a run item a
# "summary" for the table, and its numbers.


class Checks:
    """The items' work, sharing the runtime and the device batch that each depth was found to fit."""

    def __init__(self, rt, sizes: Sizes):
        self.rt, self.sizes = rt, sizes
        self.scaler = make_scaler(rt.device, rt.dtype)
        self.fits = {}  # depth -> the largest device batch that trained

    def training_setup(self, depth: int, with_fp8: bool = False):
        s = self.sizes
        config = config_from_depth(depth, s.vocab_size, s.seq_len, head_dim=s.head_dim)
        model = build_model(config, self.rt.device, self.rt.dtype)
        if with_fp8:
            fp8.convert(model)  # before compiling, as base-train does
        step_fn = torch.compile(model, dynamic=False) if s.compile else model
        return model, step_fn, model.setup_optimizer()

    def train_step(self, step_fn, optimizer, inputs, targets) -> float:
        """One step as base_train takes it: loss.item() waits for the step to finish."""
        loss = step_fn(inputs, targets)
        backward(loss, self.scaler)
        optimizer_step(optimizer, self.scaler, ddp=False)
        return loss.item()

    def throughput(self, depth: int, setting: str) -> dict:
        rt, s = self.rt, self.sizes
        if setting == "fa3" and (why := fa3_unavailable(rt.dtype)):
            return skipped(why)
        if setting == "fp8":
            try:
                fp8.check_supported(rt.device)
            except PicochatError as e:
                return skipped(str(e))
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        with attention_setting(setting):
            model, step_fn, optimizer = self.training_setup(depth, with_fp8=setting == "fp8")
            # the other setting of this depth found what fits already: start there
            tried = [b for b in s.batches if b <= self.fits.get(depth, math.inf)]
            for batch in tried:
                inputs, targets = fixed_batch(batch, s, rt.device)
                try:
                    for _ in range(s.warmup):  # compiles for this batch size
                        self.train_step(step_fn, optimizer, inputs, targets)
                    break
                except torch.OutOfMemoryError:
                    pass
                # outside the except clause, so its traceback no longer holds the activations
                model.zero_grad(set_to_none=True)
                free_memory()
            else:
                return {"status": f"fail: out of memory at every device batch tried ({tried})"}
            self.fits[depth] = batch
            losses = []
            dt = seconds_per_call(lambda: losses.append(self.train_step(step_fn, optimizer, inputs, targets)), s.steps,
                                  rt.device)
        tokens = batch * s.seq_len
        flops_per_token = model.estimate_flops()
        mfu = model_flops_utilization(flops_per_token, tokens, dt, get_peak_flops(device_name(rt.device)), 1)
        result = {"status": "ok", "batch": batch, "tok_per_s": round(tokens / dt), "step_ms": round(1000 * dt, 2),
                  "mfu": None if mfu is None else round(mfu, 2),
                  "flops_per_token": flops_per_token}
        summary = (f"B={batch}: {result['tok_per_s']:,} tok/s, MFU {format_mfu(mfu)}{'' if mfu is None else '%'}, "
                   f"{result['step_ms']} ms/step")
        if rt.device.type == "cuda":
            result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 1)
            summary += f", peak {result['peak_mem_gib']} GiB"
        summary += f", last loss {losses[-1]:.3f}"
        finite = math.isfinite(losses[-1])
        result["last_loss"] = losses[-1] if finite else str(losses[-1])  # the JSON line stays JSON
        if not finite:
            result["status"] = "fail"
        return {**result, "summary": summary}

    def attention_op(self, backend: str) -> dict:
        """Forward + backward of the attention op alone, with d12's heads, for each window of the pattern."""
        rt, s = self.rt, self.sizes
        if backend == "fa3" and (why := fa3_unavailable(rt.dtype)):
            return skipped(why)
        if backend == "flex" and rt.device.type != "cuda":
            return skipped(f"FlexAttention has no backward on {rt.device.type}")
        config = config_from_depth(s.depths[0], s.vocab_size, s.seq_len, head_dim=s.head_dim)
        short, full = sorted(set(window_sizes(config)))
        shape = (s.attention_batch, s.seq_len, config.n_head, s.head_dim)
        q, k, v = (torch.randn(shape, device=rt.device, dtype=rt.dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=rt.device, dtype=rt.dtype)
        attention.force_backend(backend)
        try:
            ms = {window: self.fwd_bwd_ms(q, k, v, grad, window) for window in (short, full)}
        finally:
            attention.force_backend(None)
        group_ms = 3 * ms[short] + ms[full]  # S, S, S, L
        return {"status": "ok", "shape": list(shape), "short_window": short, "short_ms": round(ms[short], 3),
                "full_ms": round(ms[full], 3), "sssl_group_ms": round(group_ms, 3),
                "summary": f"B={shape[0]}, {shape[2]} heads of {shape[3]}: window {short} {ms[short]:.3f} ms, "
                           f"full {ms[full]:.3f} ms, SSSL group of 4 layers {group_ms:.3f} ms"}

    def fwd_bwd_ms(self, q, k, v, grad, window: int) -> float:
        def fwd_bwd():
            torch.autograd.grad(attention.attention(q, k, v, window), (q, k, v), grad)

        for _ in range(self.sizes.warmup):
            fwd_bwd()
        return 1000 * seconds_per_call(fwd_bwd, self.sizes.steps, self.rt.device)

    def loss_falls(self) -> dict:
        rt, s = self.rt, self.sizes
        depth = s.depths[0]
        # the batch that throughput trained at, so the compiled graph comes from inductor's cache
        batch = self.fits.get(depth, s.batches[-1])
        model, step_fn, optimizer = self.training_setup(depth)
        inputs, targets = fixed_batch(batch, s, rt.device)
        losses = [self.train_step(step_fn, optimizer, inputs, targets) for _ in range(s.loss_steps)]
        bar = math.log(LEARNABLE_TOKENS)
        passed = all(math.isfinite(x) for x in losses) and losses[-1] < bar
        return {"status": "pass" if passed else "fail", "depth": depth, "batch": batch, "steps": len(losses),
                "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "bar": round(bar, 4),
                "summary": f"d{depth} B={batch}, {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                           f"(must end below ln {LEARNABLE_TOKENS} = {bar:.2f}, the loss of knowing only which "
                           f"tokens occur)"}

    def kv_decode(self, depth: int) -> dict:
        rt, s = self.rt, self.sizes
        config = config_from_depth(depth, s.vocab_size, s.seq_len, head_dim=s.head_dim)
        model = build_model(config, rt.device, rt.dtype).cast_for_inference()
        bandwidth = bench_engine.peak_bandwidth(device_name(rt.device))
        result = bench_engine.measure(model, s.decode_contexts, s.decode_batches, s.decode_steps, 2, bandwidth)
        parts = []
        for prefill in result["prefill"]:
            rows = [r for r in result["decode"] if r["context"] == prefill["context"]]
            decode = ", ".join(f"B={r['batch']} {r['decode_tok_per_s']:,.0f} tok/s ({r['speedup']:.0f}x recompute"
                               + (f", {r['roofline_fraction']:.0%} of roofline {r['roofline_tok_per_s']:,.0f}"
                                  if "roofline_fraction" in r else "") + ")" for r in rows)
            parts.append(f"ctx {prefill['context']}: prefill {prefill['prefill_tok_per_s']:,.0f} tok/s, "
                         f"TTFT {prefill['ttft_ms']:.1f} ms; {decode}")
        growth = ", ".join(f"B={b} {g:.2f}x" for b, g in result["decode_growth_longest_vs_shortest"].items())
        parts.append(f"step cost ctx {max(s.decode_contexts)} / {min(s.decode_contexts)}: {growth}")
        return {"status": "ok", "depth": depth, **result, "summary": f"d{depth}: " + "; ".join(parts)}

    def sft_step(self, depth: int) -> dict:
        rt, s = self.rt, self.sizes
        batch = self.fits.get(depth, s.batches[-1])
        model, step_fn, optimizer = self.training_setup(depth)
        inputs, targets = fixed_batch(batch, s, rt.device)
        # alternate 64-token spans unsupervised, as user turns are in SFT rows
        span = (torch.arange(s.seq_len, device=rt.device) // 64) % 2 == 0
        targets = targets.masked_fill(span, -1)
        micro = [(inputs, targets)] * 2

        def step():
            token_weighted_backward(step_fn, micro, self.scaler, ddp=False, world_size=1)
            optimizer_step(optimizer, self.scaler, ddp=False)

        for _ in range(s.warmup):  # compiles the summed-loss graph
            step()
        dt = seconds_per_call(step, s.steps, rt.device)
        tokens = 2 * batch * s.seq_len
        mfu = model_flops_utilization(model.estimate_flops(), tokens, dt, get_peak_flops(device_name(rt.device)), 1)
        return {"status": "ok", "depth": depth, "batch": batch, "accum": 2, "tok_per_s": round(tokens / dt),
                "step_ms": round(1000 * dt, 2), "mfu": None if mfu is None else round(mfu, 2),
                "summary": f"d{depth} B={batch} x 2 micro-batches: {round(tokens / dt):,} tok/s, MFU "
                           f"{format_mfu(mfu)}{'' if mfu is None else '%'}, {1000 * dt:.1f} ms/step"}

    def serve(self, depth: int) -> dict:
        rt, s = self.rt, self.sizes
        tokenizer = bench_chat.bench_tokenizer()
        config = config_from_depth(depth, tokenizer.get_vocab_size(), s.seq_len, head_dim=s.head_dim)
        engine = Engine(build_model(config, rt.device, rt.dtype).cast_for_inference(), tokenizer)
        rows = bench_serve.measure(engine, str(rt.device), s.serve_streams, s.serve_tokens)
        parts = [f"{r['streams']} streams: TTFT median {1000 * r['ttft_median_s']:.0f} ms, "
                 f"{r['tok_per_s_per_stream']:.0f} tok/s per stream, {r['aggregate_tok_per_s']:.0f} in all"
                 for r in rows]
        return {"status": "ok", "depth": depth, "results": rows, "summary": f"d{depth}: " + "; ".join(parts)}

    def rl_step(self, depth: int) -> dict:
        rt, s = self.rt, self.sizes
        tokenizer = bench_chat.bench_tokenizer()
        config = config_from_depth(depth, tokenizer.get_vocab_size(), s.seq_len, head_dim=s.head_dim)
        examples, samples, batch, new_tokens, steps = s.rl
        r = bench_rl.measure(build_model(config, rt.device, rt.dtype), tokenizer, rt, examples, samples, batch,
                             new_tokens, steps)
        return {"status": "ok", "depth": depth, **{k: round(v, 4) for k, v in r.items()},
                "summary": f"d{depth} {examples} x {samples} samples (batch {batch}, <= {new_tokens} tokens): step "
                           f"{1000 * r['step_s']:,.0f} ms = rollouts {1000 * r['rollout_s']:,.0f} ms "
                           f"({r['rollout_tok_per_s']:,.0f} tok/s) + backward {1000 * r['backward_s']:,.0f} ms + "
                           f"optimizer {1000 * r['optimizer_s']:,.0f} ms"}

    def nccl_step(self) -> dict:
        visible = torch.cuda.device_count()
        if self.rt.device.type != "cuda" or visible < 2:
            return skipped(f"{visible} GPU{'' if visible == 1 else 's'} visible")
        return two_rank_step("cuda", self.sizes)


def two_rank_step(device_type: str, sizes: Sizes) -> dict:
    """Data-parallel steps on 2 ranks (NCCL on CUDA, gloo on the CPU); pass when every parameter
    moved and is identical on both ranks."""
    # spawn, not fork, on the CPU too: a fork taken after the parent's OpenMP / compile threads ran
    # can deadlock the children (seen here: both ranks stuck on a futex)
    start_method = "spawn"
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(two_rank_worker, args=(free_port(), device_type, sizes, out_dir), nprocs=2,
                           start_method=start_method)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    n = ranks[0]["params"]
    passed = all(r["differ"] == 0 and r["moved"] == n for r in ranks)
    return {"status": "pass" if passed else "fail", "ranks": ranks,
            "summary": f"{n} parameter tensors; per rank, moved by the steps: {[r['moved'] for r in ranks]}, "
                       f"differing from rank 0's: {[r['differ'] for r in ranks]}"}


def two_rank_worker(rank: int, port: int, device_type: str, sizes: Sizes, out_dir: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rt = compute_init(device_type)  # joins the process group; every rank gets the same weights
    try:
        # small: what is checked is the sharding and the collectives, not the model
        config = config_from_depth(2, sizes.vocab_size, sizes.seq_len, head_dim=sizes.head_dim)
        model = build_model(config, rt.device, rt.dtype)
        optimizer = model.setup_optimizer()
        scaler = make_scaler(rt.device, rt.dtype)
        before = [p.detach().clone() for p in model.parameters()]
        inputs, targets = fixed_batch(2, sizes, rt.device, seed=rank)  # each rank its own rows
        # two steps: the blocks start as the identity (zero output projections), so the first
        # step's gradient is zero for every other block matrix
        for _ in range(2):
            backward(model(inputs, targets), scaler)
            optimizer_step(optimizer, scaler, ddp=True)
        moved = differ = 0
        for p, p0 in zip(model.parameters(), before):
            theirs = p.detach().clone()
            dist.broadcast(theirs, src=0)
            moved += not torch.equal(p, p0)
            differ += not torch.equal(p, theirs)
        result = {"rank": rank, "params": len(before), "moved": moved, "differ": differ}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        compute_cleanup()


# ---------------------------------------------------------------------------
# The plan, the deadline and the report


@dataclass
class Item:
    section: str
    name: str
    run: Callable[[], dict]
    result: dict | None = None


@dataclass
class Report:
    """The plan's items and their results. Written once, by the main thread at the end or by the
    deadline watchdog mid-run: hence the lock around everything that touches the results."""
    items: list
    header: dict
    path: Path
    started: float
    running: Item | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    written: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, item: Item, result: dict):
        with self.lock:
            if self.written:  # the watchdog was quicker; its JSON line must stay the last one
                return
            item.result, self.running = result, None
            print(f"[{self.elapsed():5.0f} s] {SECTIONS[item.section]} | {item.name} | {cell(result)}", flush=True)

    def failed(self) -> bool:
        with self.lock:
            return any(i.result["status"].startswith(("fail", "error")) for i in self.items)

    def finish(self) -> bool:
        """Fill in what did not run, append the markdown block, print the JSON line. False if
        already done."""
        with self.lock:
            if self.written:
                return False
            self.written = True
            for item in self.items:
                if item.result is None:
                    item.result = {"status": "killed: deadline" if item is self.running else "skipped: deadline"}
            elapsed = round(self.elapsed(), 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(self.markdown(elapsed))
            results = {key: [{"item": i.name, **i.result} for i in self.items if i.section == key]
                       for key in SECTIONS}
            print(json.dumps({**self.header, "elapsed_s": elapsed, "ok": not self.failed(), "results": results}),
                  flush=True)
            return True

    def markdown(self, elapsed: float) -> str:
        h = self.header
        title = "GPU check" + (" smoke run (tiny shapes on the CPU: the numbers mean nothing)" if h["smoke"] else "")
        lines = ["", f"## {title}, {h['date']}", "",
                 f"- device: {h['device']}, compute dtype {h['dtype']}",
                 f"- torch: {h['torch']}, CUDA {h['cuda']}",
                 f"- commit: {h['commit']}",
                 f"- command: `{h['command']}`",
                 f"- wall time: {elapsed:.0f} s (deadline {h['deadline_s']:.0f} s)", "",
                 "| section | item | result |", "|---|---|---|"]
        for key, section_title in SECTIONS.items():
            for item in (i for i in self.items if i.section == key):
                lines.append(f"| {section_title} | {item.name} | {cell(item.result)} |")
        return "\n".join(lines) + "\n"


def cell(result: dict) -> str:
    text = result["status"] + (f": {result['summary']}" if "summary" in result else "")
    return text.replace("|", "\\|").replace("\n", " ")


def git_commit() -> str:
    """Short hash, +dirty with uncommitted changes; "unknown" without git or a repository."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git repository here)"


def plan(checks: Checks, sizes: Sizes, sections: set) -> list:
    """The items in run order: the first depth and the cheap items before the bigger depths, so
    that a deadline, if it comes, cuts off the most expensive measurements, not the checks."""
    first, *rest = sizes.depths
    items = [Item("throughput", f"d{first} {s}", lambda s=s: checks.throughput(first, s)) for s in SETTINGS]
    items.append(Item("loss", f"d{first}", checks.loss_falls))
    items += [Item("attention", b, lambda b=b: checks.attention_op(b)) for b in attention.BACKENDS]
    items.append(Item("kv_decode", f"d{first}", lambda: checks.kv_decode(first)))
    items.append(Item("nccl", "2 ranks", checks.nccl_step))
    items.append(Item("sft", f"d{first}", lambda: checks.sft_step(first)))
    items.append(Item("serve", f"d{first}", lambda: checks.serve(first)))
    items.append(Item("rl", f"d{first}", lambda: checks.rl_step(first)))
    items += [Item("throughput", f"d{d} {s}", lambda d=d, s=s: checks.throughput(d, s)) for d in rest for s in SETTINGS]
    items += [Item("kv_decode", f"d{d}", lambda d=d: checks.kv_decode(d)) for d in rest]
    for item in items:
        if item.section not in sections:
            item.result = skipped("not in --sections")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="run every code path on the CPU with tiny shapes (< 1 min); the numbers mean nothing")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file to append the dated results block to "
                        "(default: bench/RESULTS.md; with --smoke, $PICOCHAT_HOME/gpu_check_smoke.md)")
    p.add_argument("--deadline-s", type=float, default=480.0,
                   help="seconds for the whole run: later items are skipped, a running one is stopped")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        p.error(f"unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))}")

    started = time.monotonic()
    # each item picks its attention backends itself; a forced one would override them all
    os.environ.pop("PICOCHAT_ATTENTION", None)
    # one process compiles GPT.forward for every depth, setting and batch size tried; past dynamo's
    # default of 8 graphs per function it would quietly fall back to eager
    torch._dynamo.config.recompile_limit = 64
    rt = compute_init("cpu" if args.smoke else "")
    sizes = SMOKE if args.smoke else GPU
    results_path = args.results or (get_base_dir() / "gpu_check_smoke.md" if args.smoke else REPO / "bench/RESULTS.md")
    name = device_name(rt.device)
    if rt.device.type == "cuda":
        name += f" ({torch.cuda.device_count()} visible)"
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name,
              "dtype": str(rt.dtype).removeprefix("torch."), "torch": torch.__version__,
              "cuda": torch.version.cuda or "none", "commit": git_commit(),
              "command": "python " + shlex.join(sys.argv), "smoke": args.smoke, "deadline_s": args.deadline_s}
    checks = Checks(rt, sizes)
    report = Report(plan(checks, sizes, sections), header, results_path, started)

    def on_deadline():
        if report.finish():
            os._exit(1 if report.failed() else 0)

    watchdog = threading.Timer(max(0.0, started + args.deadline_s - time.monotonic()), on_deadline)
    watchdog.daemon = True
    watchdog.start()
    for item in report.items:
        if report.elapsed() >= args.deadline_s:
            break  # finish() marks the rest "skipped: deadline"
        if item.result is not None:
            continue
        report.running = item
        try:
            result = item.run()
        except Exception as e:  # keep going: the other items still get their share of the GPU
            result = {"status": f"error: {type(e).__name__}: {e}"}
        report.record(item, result)
        free_memory()
    watchdog.cancel()
    report.finish()
    sys.exit(1 if report.failed() else 0)


if __name__ == "__main__":
    main()
