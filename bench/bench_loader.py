"""Throughput of the pretraining loader: tokens/s yielded by one process building
B x T batches on the CPU device from real parquet text with a real tokenizer, next
to the speed of tokenizing alone and the share of tokens the crops throw away.

    python bench/bench_loader.py                      # the shared test shards, a 32768-token BPE
    python bench/bench_loader.py --data-dir ~/.cache/picochat/base_data --tokenizer-dir ~/.cache/picochat/tokenizer

Without --tokenizer-dir it uses $PICOCHAT_HOME/tokenizer when that exists, and
otherwise trains a tokenizer in memory on every file of --data-dir (parquet text
plus any .txt files); nothing is saved. Small data is looped over as epochs.
Prints one JSON line at the end.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from picochat.dataloader import DataLoader
from picochat.dataset import list_parquet_files, split_files
from picochat.tokenizer import Tokenizer, get_tokenizer_dir

SHARED_PRETRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain"


def load_or_train_tokenizer(args):
    if args.tokenizer_dir:
        return Tokenizer.from_directory(args.tokenizer_dir), f"loaded from {args.tokenizer_dir}"
    if (get_tokenizer_dir() / "tokenizer.pkl").exists():
        return Tokenizer.from_directory(get_tokenizer_dir()), f"loaded from {get_tokenizer_dir()}"
    texts = [t for path in list_parquet_files(args.data_dir) for t in pq.read_table(path, columns=["text"])
             .column("text").to_pylist()]
    texts += [path.read_text(encoding="utf-8") for path in sorted(Path(args.data_dir).glob("*.txt"))]
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(iter(texts), args.vocab_size)
    chars = sum(map(len, texts))
    return tokenizer, f"trained in memory on {chars:,} chars of {args.data_dir} in {time.time() - t0:.1f}s"


def tokenize_only_rate(tokenizer, args) -> tuple[float, float]:
    """(tokens/s, chars per token) of tokenizer.encode alone on the first file of the split, in the loader's
    batch size and thread count: the ceiling the loader can approach."""
    texts = pq.read_table(split_files(args.data_dir, args.split)[0], columns=["text"]).column("text").to_pylist()
    bos = tokenizer.get_bos_token_id()
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(texts), args.tokenizer_batch_size):
        ids = tokenizer.encode(texts[i:i + args.tokenizer_batch_size], prepend=bos, num_threads=args.tokenizer_threads)
        tokens += sum(map(len, ids))
    return tokens / (time.perf_counter() - t0), sum(map(len, texts)) / tokens


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED_PRETRAIN,
                        help="folder of parquet shards (default: the shared test shards)")
    parser.add_argument("--tokenizer-dir", default=None, help="folder with tokenizer.pkl (default: see above)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size when a tokenizer is trained")
    parser.add_argument("--split", default="train", help="train or val")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (B)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (T)")
    parser.add_argument("--buffer-size", type=int, default=1000, help="documents kept for best-fit packing")
    parser.add_argument("--tokenizer-batch-size", type=int, default=128, help="documents per tokenizer call")
    parser.add_argument("--tokenizer-threads", type=int, default=4, help="tokenizer threads")
    parser.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tokenizer, tokenizer_source = load_or_train_tokenizer(args)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {tokenizer_source}")
    encode_rate, chars_per_token = tokenize_only_rate(tokenizer, args)
    print(f"tokenize only: {encode_rate:,.0f} tokens/s ({chars_per_token:.2f} chars/token, "
          f"{args.tokenizer_threads} threads)")

    B, T = args.batch_size, args.seq_len
    loader = DataLoader(tokenizer, B, T, args.split, args.data_dir, "cpu", rank=0, world_size=1,
                        buffer_size=args.buffer_size, tokenizer_batch_size=args.tokenizer_batch_size,
                        tokenizer_threads=args.tokenizer_threads)
    for _ in range(args.warmup):
        next(loader)
    load_before = os.getloadavg()[0]
    discarded0, batches = loader.tokens_discarded, 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < args.seconds:
        next(loader)
        batches += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    discarded = loader.tokens_discarded - discarded0
    packed = batches * B * (T + 1)
    result = {
        "bench": "loader", "tokens_per_s": round(batches * B * T / wall), "batches": batches, "B": B, "T": T,
        "seconds": round(wall, 2), "ms_per_batch": round(1000 * wall / batches, 2),
        "discarded_fraction": round(discarded / (packed + discarded), 4),
        "tokenize_only_tokens_per_s": round(encode_rate), "chars_per_token": round(chars_per_token, 2),
        "process_cpu_per_wall": round(cpu / wall, 2), "position": loader.position(),
        "vocab_size": tokenizer.get_vocab_size(), "tokenizer": tokenizer_source, "data_dir": str(args.data_dir),
        "split": args.split, "buffer_size": args.buffer_size, "tokenizer_batch_size": args.tokenizer_batch_size,
        "tokenizer_threads": args.tokenizer_threads, "cpus": os.cpu_count(),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(), "torch": torch.__version__,
    }
    print(f"loader: {result['tokens_per_s']:,} tokens/s ({batches} batches of {B}x{T} in {wall:.1f}s), "
          f"{100 * result['discarded_fraction']:.1f}% of tokens discarded by crops, now at {loader.position()}")
    print(json.dumps(result))


if __name__ == "__main__":
    from picochat import cli
    cli.run(main)
