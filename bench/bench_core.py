"""CORE evaluation speed: several examples per forward pass (picochat, up to a token budget),
with and without running each example's shared prompt prefix once, vs one example per forward
with every option in full (the reference's way), on a randomly initialised GPT. Asserts that
every mode gives the same score on every task, and prints wall time and examples/s for each.

    python bench/bench_core.py                       # depth 4, CPU, 50 examples per task
    python bench/bench_core.py --device cuda --depth 12 --max-per-task 500 --modes 1,8192,8192+share,32768+share

A mode is a token budget per forward (1 = one example per forward), "+share" to share prefixes
where it pays (picochat's default), "+noshare" never to.

The eval bundle comes from PICOCHAT_EVAL_BUNDLE (or is downloaded); tasks whose data file is
missing are skipped (a partial CORE). The tokenizer is $PICOCHAT_HOME's if there is one, else
a small one trained on --train-data.
"""

import argparse
import time
from pathlib import Path

import torch

from picochat.common import PicochatError, synchronize
from picochat.core_eval import BATCH_TOKENS, evaluate_core, load_bundle, load_tasks
from picochat.dataset import parquets_iter_batched
from picochat.gpt import build_model, config_from_depth
from picochat.tokenizer import Tokenizer, get_tokenizer

REPO = Path(__file__).resolve().parent.parent


def get_bench_tokenizer(train_data: Path, vocab_size: int) -> Tokenizer:
    try:
        return get_tokenizer()
    except PicochatError:
        texts = (t for batch in parquets_iter_batched("train", data_dir=train_data) for t in batch)
        return Tokenizer.train_from_iterator(texts, vocab_size)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
    p.add_argument("--max-per-task", type=int, default=50, help="examples per task")
    p.add_argument("--modes", default=f"1+noshare,{BATCH_TOKENS}+noshare,{BATCH_TOKENS}+share",
                   help="modes to compare: a token budget per forward (1 = one example per forward) with +share or "
                        "+noshare (prefix sharing where it pays, or never); the first is the baseline")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocab of the fallback tokenizer")
    p.add_argument("--train-data", default=str(REPO.parent / "shared" / "data" / "pretrain"),
                   help="parquet folder to train the fallback tokenizer on")
    args = p.parse_args()

    device = torch.device(args.device)
    tokenizer = get_bench_tokenizer(Path(args.train_data), args.vocab_size)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, tokenizer.get_vocab_size())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, device, dtype)
    with torch.no_grad():  # random weights whose choices differ (the default init has zero block outputs)
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
    model.eval()
    tasks = [t.label for t in load_tasks(load_bundle()) if t.path.is_file()]
    print(f"depth {args.depth} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), vocab "
          f"{tokenizer.get_vocab_size()}, {len(tasks)} tasks x {args.max_per_task} examples, {device}, "
          f"{torch.get_num_threads()} threads")

    runs = {}
    for mode in args.modes.split(","):
        budget, _, share = mode.partition("+")
        if share not in ("share", "noshare"):
            raise SystemExit(f"mode {mode!r}: write BUDGET+share or BUDGET+noshare")
        synchronize(device)
        t0 = time.perf_counter()
        result = evaluate_core(model, tokenizer, device, args.max_per_task, tasks, int(budget),
                               share_prefix=None if share == "share" else False)
        synchronize(device)
        runs[mode] = (time.perf_counter() - t0, result)

    (_, (base_s, base)), *others = runs.items()
    for mode, (_, result) in others:
        for label, r in result["tasks"].items():
            assert r["accuracy"] == base["tasks"][label]["accuracy"], (label, mode)
    print(f"\nsame accuracy on all {len(tasks)} tasks in modes {', '.join(runs)}; "
          f"{base['metric_name']} = {base['metric']:.4f}")
    print(f"{'mode':>16} {'wall s':>8} {'examples/s':>11} {'speedup':>8}")
    for mode, (seconds, result) in runs.items():
        print(f"{mode:>16} {seconds:>8.1f} {result['examples'] / seconds:>11.2f} {base_s / seconds:>7.2f}x")


if __name__ == "__main__":
    main()
