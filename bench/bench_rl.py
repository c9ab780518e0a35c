"""Speed of a chat-rl step: rollout tokens/s (the engine sampling the groups) and the time of the
policy-gradient pass and the optimizer step. Random weights and synthetic prompts: speed only
(random weights rarely stop early, so nearly every sample runs to --max-new-tokens).

    OMP_NUM_THREADS=1 python bench/bench_rl.py --depth 4                 # CPU
    python bench/bench_rl.py --depth 12 --examples 4 --num-samples 16 --device-batch 8 --max-new-tokens 256  # GPU

The step is chat-rl's own: picochat.rl.rollout for each example (num_samples completions in
batches of --device-batch, seeded as chat-rl seeds them), policy_gradient_backward on each group,
then optimizer_step. The reward is random (seeded), so the advantages are not all zero and the
backward does its full work. Prints a table, then one JSON line.
"""

import argparse
import json
import random
import time

import torch
from bench_chat import bench_tokenizer, conversations

from picochat.common import compute_init, device_name, synchronize
from picochat.engine import Engine
from picochat.gpt import build_model, config_from_depth
from picochat.rl import policy_gradient_backward, rollout
from picochat.tasks.common import Task
from picochat.training import make_scaler, optimizer_step


class CoinFlips(Task):
    """Synthetic prompts; the reward of a completion is a coin flip seeded by its text."""

    eval_type = "generative"

    def __init__(self, n: int):
        super().__init__()
        self.rows = conversations(n, seed=3)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]["messages"][:2]}

    def reward(self, conversation: dict, completion: str) -> float:
        return float(random.Random(completion).random() < 0.5)


def measure(model, tokenizer, rt, examples: int, num_samples: int, device_batch: int, max_new_tokens: int,
            steps: int) -> dict:
    """Mean timings of `steps` RL steps after one untimed step (allocation, the optimizer's kernels)."""
    task = CoinFlips(examples * (steps + 1))
    engine = Engine(model, tokenizer)
    optimizer = model.setup_optimizer()
    scaler = make_scaler(rt.device, rt.dtype)
    rows = []
    for step in range(steps + 1):
        synchronize(rt.device)
        t0 = time.perf_counter()
        model.eval()
        groups = [rollout(engine, task, task[step * examples + i], step, i, num_samples, device_batch, max_new_tokens,
                          1.0, 50, rt.device) for i in range(examples)]
        synchronize(rt.device)
        t1 = time.perf_counter()
        model.train()
        for group in groups:
            policy_gradient_backward(model, group, device_batch, examples, scaler)
        synchronize(rt.device)
        t2 = time.perf_counter()
        optimizer_step(optimizer, scaler, ddp=False)
        synchronize(rt.device)
        t3 = time.perf_counter()
        tokens = sum(sum(g.lengths) for g in groups)
        rows.append({"rollout_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0,
                     "generated_tokens": tokens, "sequence_tokens": sum(g.inputs.numel() for g in groups)})
    timed = rows[1:]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0]}
    return {**mean, "rollout_tok_per_s": mean["generated_tokens"] / mean["rollout_s"],
            "backward_tok_per_s": mean["sequence_tokens"] / mean["backward_s"], "steps": steps,
            "samples_per_step": examples * num_samples}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_rl", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--seq-len", type=int, default=512, help="the model's sequence length")
    p.add_argument("--examples", type=int, default=2, help="prompts per step (one process)")
    p.add_argument("--num-samples", type=int, default=8, help="completions per prompt")
    p.add_argument("--device-batch", type=int, default=8, help="sequences per generation batch and backward pass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion at most")
    p.add_argument("--steps", type=int, default=2, help="steps timed (after one untimed)")
    p.add_argument("--device-type", default="", help="cuda, mps or cpu (default: autodetect)")
    args = p.parse_args(argv)

    rt = compute_init(args.device_type)
    tokenizer = bench_tokenizer()
    torch.manual_seed(0)
    model = build_model(config_from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len), rt.device, rt.dtype)
    r = measure(model, tokenizer, rt, args.examples, args.num_samples, args.device_batch, args.max_new_tokens,
                args.steps)
    name = device_name(rt.device)
    print(f"{name} | depth {args.depth} | {rt.dtype} | vocab {tokenizer.get_vocab_size()} | {args.examples} examples "
          f"x {args.num_samples} samples, batch {args.device_batch}, <= {args.max_new_tokens} new tokens")
    print(f"step {1000 * r['step_s']:,.0f} ms = rollouts {1000 * r['rollout_s']:,.0f} ms "
          f"({r['rollout_tok_per_s']:,.0f} generated tok/s, {r['generated_tokens']:,.0f} tokens) + backward "
          f"{1000 * r['backward_s']:,.0f} ms ({r['backward_tok_per_s']:,.0f} tok/s over padded rows) + optimizer "
          f"{1000 * r['optimizer_s']:,.0f} ms")
    print(json.dumps({"device": name, "depth": args.depth, "dtype": str(rt.dtype), "args": vars(args), "rl": r}))


if __name__ == "__main__":
    main()
