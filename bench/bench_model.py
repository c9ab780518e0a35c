"""Model throughput: tokens/s and MFU of forward + backward for one model size on this device.

    python bench/bench_model.py --depth 12 --batch 32 --seq-len 2048 --compile

Random tokens, no optimizer step, no data loading: this measures the model alone.
MFU = estimate_flops() (training FLOPs per token) * tokens/s / the device's peak bf16 FLOP/s.
Prints one line per timed step and a JSON summary as the last line.
"""

import argparse
import json
import math
import time

import torch

from picochat.common import compute_init, device_name, get_peak_flops, synchronize
from picochat.gpt import build_model, config_from_depth


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_model", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width = depth * aspect ratio)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (also the model's sequence_len)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--aspect-ratio", type=int, default=64, help="width per layer of depth")
    p.add_argument("--head-dim", type=int, default=128, help="attention head size")
    p.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern (S short, L long)")
    p.add_argument("--preset", default="default", help="model recipe (default, jan29)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)

    rt = compute_init(args.device_type)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, args.aspect_ratio, args.head_dim,
                               args.window_pattern, args.preset)
    model = build_model(config, rt.device, rt.dtype)
    step_fn = torch.compile(model, dynamic=False) if args.compile else model
    g = torch.Generator(device=rt.device).manual_seed(0)
    x, y = torch.randint(0, args.vocab_size, (2, args.batch, args.seq_len), device=rt.device, generator=g)

    tokens = args.batch * args.seq_len
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(rt.device)
        t0 = time.perf_counter()
        loss = step_fn(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        synchronize(rt.device)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        print(f"step {i:3d}{' (warmup)' if i < args.warmup else ''} | {dt * 1000:8.1f} ms | "
              f"{tokens / dt:,.0f} tok/s | loss {loss.item():.4f}", flush=True)

    dt = sum(times) / len(times)
    tok_per_s = tokens / dt
    flops_per_token = model.estimate_flops()
    name = device_name(rt.device)
    peak = get_peak_flops(name)
    result = {
        "device": name, "dtype": str(rt.dtype).removeprefix("torch."), "depth": args.depth, "n_embd": config.n_embd,
        "params": model.num_scaling_params()["total"], "batch": args.batch, "seq_len": args.seq_len,
        "compile": args.compile, "preset": args.preset, "window_pattern": args.window_pattern,
        "flops_per_token": flops_per_token, "step_ms": round(dt * 1000, 2), "tok_per_s": round(tok_per_s, 1),
        "tflops": round(flops_per_token * tok_per_s / 1e12, 4),
        "peak_flops": None if math.isinf(peak) else peak,
        "mfu": None if math.isinf(peak) else round(flops_per_token * tok_per_s / peak, 4),
        "max_mem_gb": round(torch.cuda.max_memory_allocated(rt.device) / 1e9, 2) if rt.device.type == "cuda" else None,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
