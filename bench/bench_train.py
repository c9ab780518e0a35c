"""Training throughput on the current device: tokens/s and MFU of full training steps
(forward, backward and the MuonAdamW step) for one model size, on random tokens.
Prints one JSON line.

    python bench/bench_train.py --depth 12 --device-batch-size 32 --max-seq-len 2048

Steps are timed like base_train times them (synchronize, step, loss.item(), synchronize);
the first --warmup steps (compilation) are left out.
"""

import argparse
import json
import time

import torch

from picochat import cli
from picochat.common import compute_init, device_name, get_peak_flops, out_of_memory_hint, synchronize
from picochat.gpt import build_model, config_from_depth


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_train", description="tokens/s and MFU of full training steps")
    p.add_argument("--depth", type=int, default=12, help="model depth")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--max-seq-len", type=int, default=2048, help="sequence length")
    p.add_argument("--aspect-ratio", type=int, default=64, help="width = depth x aspect ratio")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--preset", default="default", help="architecture preset")
    p.add_argument("--grad-accum", type=int, default=1, help="forward/backward passes per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto = CUDA)")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu ('' = autodetect)")
    args = p.parse_args(argv)

    rt = compute_init(args.device_type)
    device = rt.device
    config = config_from_depth(args.depth, args.vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim,
                               args.window_pattern, args.preset)
    orig_model = build_model(config, device, rt.dtype)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    optimizer = orig_model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02,
                                           weight_decay=0.28, scalar_lr=0.5)
    B, T = args.device_batch_size, args.max_seq_len
    tokens = torch.randint(0, args.vocab_size, (args.grad_accum, B, T + 1), device=device)
    inputs, targets = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()

    def train_step():
        for micro in range(args.grad_accum):
            loss = model(inputs[micro], targets[micro])
            (loss / args.grad_accum).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    with out_of_memory_hint("--device-batch-size", B, f"at depth {args.depth}, T={T}"):
        for _ in range(args.warmup):
            train_step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step()
        synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps

    flops_per_token = orig_model.estimate_flops()
    tok_per_s = B * T * args.grad_accum / dt
    peak = get_peak_flops(device_name(device))
    result = {
        "bench": "train", "device": device_name(device), "dtype": str(rt.dtype).removeprefix("torch."),
        "compile": use_compile, "depth": args.depth, "n_embd": config.n_embd,
        "params": orig_model.num_scaling_params()["total"], "flops_per_token": flops_per_token,
        "device_batch_size": B, "max_seq_len": T, "grad_accum": args.grad_accum, "window_pattern": args.window_pattern,
        "step_ms": round(dt * 1000, 2), "tok_per_s": round(tok_per_s, 1),
        "mfu": round(100 * flops_per_token * tok_per_s / peak, 2),
    }
    if device.type == "cuda":
        result["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
