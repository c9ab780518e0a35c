"""Inference speed of the KV-cache engine: prefill tokens/s, time to first token, and per-step
decode latency and tokens/s per batch size and context length, against the same model decoding
by recomputing the whole sequence at every step. Random weights and tokens: speed only.

    OMP_NUM_THREADS=1 python bench/bench_engine.py --depth 4            # CPU
    python bench/bench_engine.py --depth 12 --contexts 128,1024,2048    # GPU

A cached decode step reads every weight once plus the keys and values its windows can reach, so
its cost should barely grow with context; recomputation grows with it. On a device with a known
memory bandwidth (table below, or PICOCHAT_PEAK_BANDWIDTH in bytes/s) the batch-1 roofline
(bandwidth / (weight bytes + KV bytes read per step)) and the fraction of it reached are printed.
Prints a table, then one JSON line.
"""

import argparse
import json
import os
import re
import statistics
import time

import torch

from picochat.common import compute_init, device_name, synchronize
from picochat.engine import KVCache, prefill, sample_next
from picochat.gpt import build_model, config_from_depth

# Peak memory bandwidth in bytes/s, first match wins (datasheets: H100 SXM 3.35 TB/s, H100 PCIe
# 2.0 TB/s, H200 4.8 TB/s, A100 80GB SXM 2.039 TB/s, A100 40GB 1.555 TB/s, L40S 864 GB/s, 4090 1,008 GB/s)
PEAK_BANDWIDTH = [
    (r"h200", 4.8e12),
    (r"h100.*pcie", 2.0e12),
    (r"h100", 3.35e12),
    (r"a100.*80", 2.039e12),
    (r"a100", 1.555e12),
    (r"l40s", 864e9),
    (r"4090", 1.008e12),
]


def peak_bandwidth(name: str) -> float | None:
    if os.environ.get("PICOCHAT_PEAK_BANDWIDTH"):
        return float(os.environ["PICOCHAT_PEAK_BANDWIDTH"])
    return next((bw for pattern, bw in PEAK_BANDWIDTH if re.search(pattern, name.lower())), None)


def timed(device, fn, *args):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return time.perf_counter() - t0, out


def decode_step(model, column, cache):
    """One column as the engine decodes it: forward, pick, the one host sync; the next column."""
    tokens = sample_next(model(column, cache=cache)[:, -1], None, 0.0, None).tolist()
    return torch.tensor(tokens, device=column.device)[:, None]


def recompute_step(model, ids):
    """The next tokens the slow way: a forward over the whole sequence."""
    return model(ids)[:, -1].argmax(-1).tolist()


def kv_bytes_read(model, context: int) -> int:
    """Bytes of keys and values one row's decode step reads at this context (windows cut it)."""
    c = model.config
    per_position = 2 * c.n_kv_head * (c.n_embd // c.n_head) * torch.empty((), dtype=model.compute_dtype).element_size()
    return sum(per_position * min(context, w + 1) for w in model.window_sizes)


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads: every matrix, but one row per embedding."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)


def bench_context(model, context, batch_sizes, decode_tokens, recompute_tokens, rng):
    device = model.get_device()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=rng).tolist()
    prompt_cache = KVCache(model, 1, context)
    prefill_s, logits = timed(device, prefill, model, [prompt], prompt_cache)
    first_s, _ = timed(device, lambda logits: sample_next(logits, None, 0.0, None).tolist(), logits)
    rows = []
    for batch in batch_sizes:
        cache = KVCache(model, batch, context + decode_tokens + 1)
        cache.copy_rows_from(prompt_cache)
        column = torch.randint(0, vocab, (batch, 1), generator=rng, device="cpu").to(device)
        steps = []
        for _ in range(decode_tokens):  # one step = forward of one column, sample, the one host sync
            dt, column = timed(device, decode_step, model, column, cache)
            steps.append(dt)
        cached = statistics.median(steps[1:])  # the first step warms up
        ids = torch.randint(0, vocab, (batch, context), generator=rng).to(device)
        full = []
        for i in range(recompute_tokens):
            dt, _ = timed(device, recompute_step, model, ids[:, :context - recompute_tokens + i + 1])
            full.append(dt)
        recompute = statistics.median(full)
        rows.append(dict(context=context, batch=batch, decode_ms=cached * 1e3, decode_tok_per_s=batch / cached,
                         recompute_ms=recompute * 1e3, recompute_tok_per_s=batch / recompute,
                         speedup=recompute / cached))
    return dict(context=context, prefill_tok_per_s=context / prefill_s, ttft_ms=(prefill_s + first_s) * 1e3), rows


def measure(model, contexts, batch_sizes, decode_tokens: int, recompute_tokens: int, bandwidth) -> dict:
    """Every measurement for this model: prefill per context, decode per context and batch (with
    the batch-1 roofline where the bandwidth is known), and how a decode step's cost grows from the
    shortest context to the longest, per batch size."""
    rng = torch.Generator().manual_seed(0)
    weights = weight_bytes_read(model)
    prefills, rows = [], []
    with torch.inference_mode():
        for context in contexts:
            prefill, context_rows = bench_context(model, context, batch_sizes, decode_tokens, recompute_tokens, rng)
            prefills.append(prefill)
            for row in context_rows:
                if row["batch"] == 1 and bandwidth is not None:
                    row["roofline_tok_per_s"] = bandwidth / (weights + kv_bytes_read(model, context))
                    row["roofline_fraction"] = row["decode_tok_per_s"] / row["roofline_tok_per_s"]
            rows += context_rows
    growth = {}
    for b in batch_sizes:
        by_context = {r["context"]: r["decode_ms"] for r in rows if r["batch"] == b}
        growth[b] = by_context[max(contexts)] / by_context[min(contexts)]
    return {"weight_bytes": weights, "peak_bandwidth": bandwidth, "prefill": prefills, "decode": rows,
            "decode_growth_longest_vs_shortest": growth}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_engine", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--sequence-len", type=int, default=2048, help="the model's training length (windows from it)")
    p.add_argument("--contexts", default="128,1024", help="prompt lengths, comma-separated")
    p.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--recompute-tokens", type=int, default=3, help="full-recomputation steps timed per batch size")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)

    rt = compute_init(args.device_type)
    config = config_from_depth(args.depth, args.vocab_size, args.sequence_len)
    model = build_model(config, rt.device, rt.dtype).cast_for_inference()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    name = device_name(rt.device)
    bandwidth = peak_bandwidth(name)
    result = measure(model, contexts, batches, args.decode_tokens, args.recompute_tokens, bandwidth)
    print(f"{name} | depth {args.depth} | {rt.dtype} | weights read per step {result['weight_bytes'] / 1e6:.1f} MB | "
          f"peak bandwidth {'unknown' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'}")
    for row in result["prefill"]:
        print(f"context {row['context']}: prefill {row['prefill_tok_per_s']:,.0f} tok/s, "
              f"time to first token {row['ttft_ms']:.1f} ms")
    print(f"{'context':>8} {'batch':>6} {'decode ms':>10} {'tok/s':>10} {'recompute ms':>13} {'tok/s':>10} "
          f"{'speedup':>8}  roofline")
    for r in result["decode"]:
        roof = f"{r['roofline_fraction']:.0%} of {r['roofline_tok_per_s']:,.0f} tok/s" if "roofline_fraction" in r \
            else "n/a"
        print(f"{r['context']:>8} {r['batch']:>6} {r['decode_ms']:>10.2f} {r['decode_tok_per_s']:>10,.0f} "
              f"{r['recompute_ms']:>13.2f} {r['recompute_tok_per_s']:>10,.0f} {r['speedup']:>7.1f}x  {roof}")
    growth = result["decode_growth_longest_vs_shortest"]
    print("decode step cost, longest / shortest context: " + ", ".join(f"batch {b}: {g:.2f}x"
                                                                       for b, g in growth.items()))
    print(json.dumps({"device": name, "depth": args.depth, "dtype": str(rt.dtype), **result}))


if __name__ == "__main__":
    main()
