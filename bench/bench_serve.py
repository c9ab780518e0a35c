"""Serving speed of `picochat chat-web`: time to first token and tokens/s per stream with 1, 8
and 32 concurrent streaming requests, over HTTP to the real app (uvicorn in a thread) with one
worker. Random weights and bench_chat's tokenizer: speed only.

    OMP_NUM_THREADS=1 python bench/bench_serve.py --depth 4            # CPU
    python bench/bench_serve.py --depth 12                             # GPU

One worker generates one request at a time, so with N concurrent streams a request waits for the
ones before it: its time to first token grows with N while its tokens/s (first token to last)
stays about that of a single stream. Prints a table, then one JSON line.
"""

import argparse
import asyncio
import json
import statistics
import threading
import time

import bench_chat  # bench/ is on sys.path when this file runs as a script
import httpx
import torch
import uvicorn

from picochat.common import compute_init, device_name
from picochat.engine import Engine
from picochat.gpt import build_model, config_from_depth
from picochat.serve import Worker
from picochat.stages.chat_web import ChatWebConfig, Server, build_app


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine, device: str, max_queue: int):
    """The chat-web app over this engine on a free port, in a background thread; (url, stop)."""
    c = ChatWebConfig(max_queue=max_queue, port=free_port())
    server = Server(c, [Worker(0, engine, device)], "bench", f"d{engine.model.config.n_layer}", 0)
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=c.port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{c.port}"
    while not uv.started:
        time.sleep(0.05)

    def stop():
        uv.should_exit = True
        thread.join()

    return url, stop


async def one_stream(ac, url: str, max_tokens: int, seed: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Tell me a story about the number {seed}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with ac.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - t0, "tokens": tokens, "tok_per_s": (tokens - 1) / (end - first) if end > first else 0.0,
            "total_s": end - t0}


async def concurrent(url: str, streams: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as ac:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(ac, url, max_tokens, seed) for seed in range(streams)))
        wall = time.perf_counter() - t0
    summary = {"streams": streams, "ttft_median_s": statistics.median(r["ttft_s"] for r in results),
               "ttft_max_s": max(r["ttft_s"] for r in results),
               "tok_per_s_per_stream": statistics.median(r["tok_per_s"] for r in results)}
    tokens = sum(r["tokens"] for r in results)
    return {**summary, "tokens": tokens, "aggregate_tok_per_s": tokens / wall, "wall_s": wall}


def measure(engine, device: str, stream_counts, max_tokens: int) -> list[dict]:
    url, stop = start_server(engine, device, max_queue=max(stream_counts))
    try:
        asyncio.run(concurrent(url, 1, 4))  # warm up (first forward, allocations)
        return [asyncio.run(concurrent(url, n, max_tokens)) for n in stream_counts]
    finally:
        stop()


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--seq-len", type=int, default=512, help="the model's training length")
    p.add_argument("--streams", default="1,8,32", help="concurrent streams, comma-separated")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)
    rt = compute_init(args.device_type)
    tokenizer = bench_chat.bench_tokenizer()
    torch.manual_seed(0)
    model = build_model(config_from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len), rt.device, rt.dtype)
    engine = Engine(model.cast_for_inference(), tokenizer)
    name = device_name(rt.device)
    rows = measure(engine, str(rt.device), [int(n) for n in args.streams.split(",")], args.max_tokens)
    print(f"{name} | depth {args.depth} | {rt.dtype} | 1 worker | {args.max_tokens} tokens per answer")
    print(f"{'streams':>7} {'TTFT median':>12} {'TTFT max':>9} {'tok/s/stream':>13} {'aggregate tok/s':>16}")
    for r in rows:
        print(f"{r['streams']:>7} {r['ttft_median_s'] * 1000:>10.0f}ms {r['ttft_max_s']:>8.2f}s "
              f"{r['tok_per_s_per_stream']:>13.1f} {r['aggregate_tok_per_s']:>16.1f}")
    print(json.dumps({"device": name, "depth": args.depth, "dtype": str(rt.dtype), "args": vars(args),
                      "results": rows}))


if __name__ == "__main__":
    main()
