"""Speed of the chat stages' work: an SFT step (tokens/s, ms, MFU) and how fast SFTLoader packs
rows, then chat-eval problems/s for a categorical and a generative task, batched against one
problem at a time. Random weights and synthetic conversations: speed only.

    OMP_NUM_THREADS=1 python bench/bench_chat.py --depth 4              # CPU
    python bench/bench_chat.py --depth 12 --seq-len 2048 --device-batch 16   # GPU

The SFT step is chat-sft's own (training.token_weighted_backward over the micro-batches, then
optimizer_step) on rows SFTLoader packed from the conversations, about half of whose targets are
masked. Tokens/s counts every row position (padding too), as chat-sft's log does. The tokenizer
is $PICOCHAT_HOME's if there is one, else a small one trained here on the synthetic text.
Prints a table, then one JSON line.
"""

import argparse
import json
import random
import time

import torch

from picochat.chat_eval import evaluate_task
from picochat.common import PicochatError, compute_init, device_name, get_peak_flops, synchronize
from picochat.engine import Engine
from picochat.gpt import build_model, config_from_depth
from picochat.sft_data import SFTLoader
from picochat.tasks.common import MultipleChoiceTask, Task, render_mc
from picochat.tokenizer import Tokenizer, get_tokenizer
from picochat.training import format_mfu, make_scaler, model_flops_utilization, optimizer_step, token_weighted_backward

# pseudo-words of 1-4 syllables: enough distinct pairs for a tokenizer to learn its merges from
_syllables = random.Random(0)
WORDS = ["".join(_syllables.choice("bcdfghklmnprstvz") + _syllables.choice("aeiou")
                 for _ in range(_syllables.randint(1, 4))) for _ in range(3000)]


def sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Chat-shaped conversations of 1-3 turns with replies of varied length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": sentence(rng, rng.randint(5, 40))})
            messages.append({"role": "assistant", "content": sentence(rng, rng.randint(5, 120))})
        out.append({"messages": messages})
    return out


def bench_tokenizer() -> Tokenizer:
    try:
        return get_tokenizer()
    except PicochatError:
        return Tokenizer.train_from_iterator((sentence(random.Random(i), 200) for i in range(2000)), 1024)


class Questions(MultipleChoiceTask):
    """Four-choice questions whose prompts vary in length."""

    def __init__(self, n: int):
        super().__init__()
        self.rows = conversations(n, seed=1)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        question = self.rows[index]["messages"][0]["content"]
        letters = ("A", "B", "C", "D")
        choices = [f"{WORDS[(index + k) % len(WORDS)]} {k}" for k in range(4)]
        return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                             {"role": "assistant", "content": letters[index % 4]}], "letters": letters}


class Prompts(Task):
    """Generative problems that nothing passes; counts the tokens of the completions it sees."""

    eval_type = "generative"

    def __init__(self, n: int, tokenizer):
        super().__init__()
        self.rows = conversations(n, seed=2)
        self.tokenizer, self.completions, self.tokens = tokenizer, 0, 0

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]["messages"][:2]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        self.completions += 1
        self.tokens += len(self.tokenizer.encode(completion))
        return False


def sft_steps(model, tokenizer, rt, device_batch: int, seq_len: int, accum: int, steps: int, compile: bool) -> dict:
    data = conversations(4000)
    loader = SFTLoader(tokenizer, data, device_batch, seq_len, rt.device)
    t0 = time.perf_counter()
    batches = [next(loader) for _ in range(accum * (steps + 1))]
    pack_s = time.perf_counter() - t0
    supervised = sum(int((y >= 0).sum()) for _, y in batches) / sum(y.numel() for _, y in batches)
    optimizer = model.setup_optimizer()
    scaler = make_scaler(rt.device, rt.dtype)
    step_fn = torch.compile(model, dynamic=False) if compile else model
    times = []
    for step in range(steps + 1):  # the first step (compilation, allocation) is not timed
        micro = batches[step * accum:(step + 1) * accum]
        synchronize(rt.device)
        t = time.perf_counter()
        loss = token_weighted_backward(step_fn, micro, scaler, ddp=False, world_size=1)
        optimizer_step(optimizer, scaler, ddp=False)
        synchronize(rt.device)
        times.append(time.perf_counter() - t)
    dt = sum(times[1:]) / steps
    tokens = device_batch * seq_len * accum
    mfu = model_flops_utilization(model.estimate_flops(), tokens, dt, get_peak_flops(device_name(rt.device)), 1)
    return {"tokens_per_step": tokens, "step_ms": 1000 * dt, "tok_per_s": tokens / dt, "mfu": mfu,
            "supervised_fraction": supervised, "pack_rows_per_s": len(batches) * device_batch / pack_s,
            "step_rows_per_s": device_batch * accum / dt, "last_loss": loss}


def eval_speed(model, tokenizer, rt, problems: int, batch: int, max_new_tokens: int) -> list[dict]:
    model = model.cast_for_inference()
    engine = Engine(model, tokenizer)
    rows = []
    for task, kind in ((Questions(problems), "categorical"), (Prompts(problems, tokenizer), "generative")):
        speeds = {}
        for b in dict.fromkeys((1, batch)):
            r = evaluate_task(task, model, tokenizer, engine, rt.device, batch_size=b, max_new_tokens=max_new_tokens)
            speeds[b] = r["total"] / r["seconds"]
        row = {"task": kind, "problems": problems, "batch": batch, "one_at_a_time_per_s": speeds[1],
               "batched_per_s": speeds[batch], "speedup": speeds[batch] / speeds[1]}
        if kind == "generative":  # the work per problem: decoded tokens, the same in both modes
            row["tokens_per_completion"] = task.tokens / task.completions
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_chat", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--seq-len", type=int, default=512, help="SFT row length (the model's sequence length)")
    p.add_argument("--device-batch", type=int, default=4, help="SFT rows per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per SFT step")
    p.add_argument("--steps", type=int, default=3, help="SFT steps timed (after one untimed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the SFT steps")
    p.add_argument("--problems", type=int, default=32, help="problems per chat-eval task")
    p.add_argument("--eval-batch", type=int, default=8, help="problems per batch in batched chat-eval")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens sampled per generative problem")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)

    rt = compute_init(args.device_type)
    tokenizer = bench_tokenizer()
    config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len)
    torch.manual_seed(0)
    model = build_model(config, rt.device, rt.dtype)
    name = device_name(rt.device)
    sft = sft_steps(model, tokenizer, rt, args.device_batch, args.seq_len, args.accum, args.steps, args.compile)
    print(f"{name} | depth {args.depth} | {rt.dtype} | vocab {tokenizer.get_vocab_size()} | "
          f"compile {'on' if args.compile else 'off'}")
    print(f"SFT step ({args.device_batch} x {args.seq_len} x {args.accum} = {sft['tokens_per_step']:,} tokens, "
          f"{sft['supervised_fraction']:.0%} supervised): {sft['step_ms']:.1f} ms, {sft['tok_per_s']:,.0f} tok/s, "
          f"MFU {format_mfu(sft['mfu'])}; SFTLoader packs {sft['pack_rows_per_s']:,.0f} rows/s, "
          f"the step consumes {sft['step_rows_per_s']:,.1f}")
    evals = eval_speed(model, tokenizer, rt, args.problems, args.eval_batch, args.max_new_tokens)
    print(f"{'chat-eval task':<14} {'problems':>8} {'1 at a time/s':>14} {f'batch {args.eval_batch}/s':>12} "
          f"{'speedup':>8}")
    for r in evals:
        print(f"{r['task']:<14} {r['problems']:>8} {r['one_at_a_time_per_s']:>14.2f} {r['batched_per_s']:>12.2f} "
              f"{r['speedup']:>7.2f}x" + (f"  ({r['tokens_per_completion']:.1f} tokens per completion)"
                                           if "tokens_per_completion" in r else ""))
    print(json.dumps({"device": name, "depth": args.depth, "dtype": str(rt.dtype), "args": vars(args), "sft": sft,
                      "chat_eval": evals}))


if __name__ == "__main__":
    main()
