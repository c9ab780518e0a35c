"""Chat evaluation: how often a chat model answers the chat tasks right, and ChatCORE.

Two kinds of task (task.eval_type):
- categorical (ARC, MMLU): multiple choice answered with a letter. batch_size prompts, right-padded
  with BOS, go through one forward; at each prompt's last position (<|assistant_start|>, which
  predicts the answer's first token) only the allowed letters compete, and the likeliest is the
  answer. Nothing is sampled, so temperature, top-k and the sample count do not apply.
- generative (GSM8K, HumanEval, SpellingBee): the engine samples num_samples completions for each
  of batch_size problems at once (left-padded, engine.complete); a problem passes if any of its
  completions does (pass@num_samples).
Whole batches of problems go to the ranks in turn, and the counts are summed.

What batching changes, for generative tasks: a padded row computes what it would alone only up to
rounding (in bf16 that can flip a near-tie of greedy decoding); with temperature > 0 one seeded
generator serves the batch, so a problem's samples depend on its batch-mates; and the new-token
budget is cut by the batch's longest prompt near the model's context limit. batch_size 1 on one
process is the reference's way (each problem alone, seed 42).

ChatCORE: the mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of each accuracy
centered on its random-guess baseline. Like CORE (core_eval.core_metric_name), only all five run
in full is "ChatCORE"; anything less is named for what it left out. SpellingBee is evaluated but
is not part of it (the reference dropped it from ChatCORE).
"""

import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.common import PicochatError, get_rank, get_world_size


def _arc(subset: str):
    from picochat.tasks.arc import ARC

    return ARC(subset=subset, split="test")


def _mmlu():
    from picochat.tasks.mmlu import MMLU

    return MMLU(subset="all", split="test")


def _gsm8k():
    from picochat.tasks.gsm8k import GSM8K

    return GSM8K(subset="main", split="test")


def _humaneval():
    from picochat.tasks.humaneval import HumanEval

    return HumanEval()


def _spelling_bee():
    from picochat.tasks.spelling import SpellingBee

    return SpellingBee(size=256, split="test")


class TaskSpec(NamedTuple):
    build: Callable  # () -> the task's evaluation split, as the reference evaluates it
    baseline: float  # the accuracy of guessing at random


TASKS = {
    "ARC-Easy": TaskSpec(partial(_arc, "ARC-Easy"), 0.25),
    "ARC-Challenge": TaskSpec(partial(_arc, "ARC-Challenge"), 0.25),
    "MMLU": TaskSpec(_mmlu, 0.25),
    "GSM8K": TaskSpec(_gsm8k, 0.0),
    "HumanEval": TaskSpec(_humaneval, 0.0),
    "SpellingBee": TaskSpec(_spelling_bee, 0.0),
}
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")


def build_task(name: str):
    if name not in TASKS:
        raise PicochatError(f"unknown chat task {name!r} (one of {', '.join(TASKS)})")
    return TASKS[name].build()


def centered(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect accuracy."""
    return (accuracy - baseline) / (1.0 - baseline)


def letter_token(tokenizer, letter: str, cache: dict) -> int:
    if letter not in cache:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise PicochatError(f"answer letter {letter!r} is {len(ids)} tokens, not one: categorical evaluation "
                                "compares the logits of single-token letters")
        cache[letter] = ids[0]
    return cache[letter]


@torch.no_grad()
def evaluate_categorical(task, model, tokenizer, device, batches, bar) -> int:
    """Correct answers over the problems of batches (lists of problem indices), one forward each."""
    bos = tokenizer.get_bos_token_id()
    letter_ids, correct = {}, 0
    for batch in batches:
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        T = max(map(len, prompts))
        ids = torch.tensor([p + [bos] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)
        # the model is causal: the padding after a prompt cannot change its last position's logits
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = model(ids)[torch.arange(len(prompts), device=device), last].float().cpu()  # one sync per batch
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            allowed = [letter_token(tokenizer, letter, letter_ids) for letter in letters]
            choice = letters[int(logits[row, allowed].argmax())]  # ties go to the first letter, as in the reference
            correct += bool(task.evaluate(conversation, choice))
        bar.update(len(batch))
    return correct


SAMPLES_KEPT = 3  # generative answers kept per task (this rank's first problems), for the report


def evaluate_generative(task, tokenizer, engine, batches, num_samples, max_new_tokens, temperature, top_k,
                        bar) -> tuple[int, list[dict]]:
    """Problems of batches (lists of problem indices) that at least one of num_samples completions
    solves, each batch's problems sampled together (engine.complete); and the first problems'
    first completions, {"question", "answer", "correct"}."""
    # At temperature 0 every sample follows the argmax (and the tool is deterministic), so one
    # sample gives the verdict of all of them.
    samples = 1 if temperature == 0 else num_samples
    correct, kept = 0, []
    for batch in batches:
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        outputs = engine.complete(prompts, samples, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        for conversation, prompt, (sequences, _) in zip(conversations, prompts, outputs):
            answers = [tokenizer.decode(s[len(prompt):]) for s in sequences]
            verdicts = [bool(task.evaluate(conversation, a)) for a in answers]
            correct += any(verdicts)
            if len(kept) < SAMPLES_KEPT:
                question = next(m["content"] for m in reversed(conversation["messages"]) if m["role"] == "user")
                kept.append({"question": question, "answer": answers[0], "correct": verdicts[0]})
        bar.update(len(batch))
    return correct, kept


def evaluate_task(task, model, tokenizer, engine, device, batch_size: int = 8, num_samples: int = 1,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_k: int = 50,
                  max_problems: int | None = None) -> dict:
    """Evaluate one task: a name in TASKS or a task object. The first max_problems problems (None:
    all) are split across ranks. Returns {accuracy, correct, total, seconds, max_problems,
    task_size}: the counts summed over ranks, task_size the problems the task has (total is less
    when max_problems cut it). batch_size is problems per forward (categorical) or per sampling
    batch (generative: batch_size x num_samples rows, one per problem at temperature 0); the
    sampling arguments apply to generative tasks (top_k 0: all tokens)."""
    t0 = time.time()
    label = task if isinstance(task, str) else type(task).__name__
    if isinstance(task, str):
        task = build_task(task)
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    if num_problems == 0:
        raise PicochatError(f"task {label} has no problems to evaluate")
    rank, world = get_rank(), get_world_size()
    # whole batches to the ranks in turn, so every batch is full but the last
    starts = range(rank * batch_size, num_problems, world * batch_size)
    batches = [range(s, min(s + batch_size, num_problems)) for s in starts]
    mine = sum(map(len, batches))
    bar = tqdm(total=mine, desc=label, leave=False, disable=rank != 0)
    samples = []
    if task.eval_type == "categorical":
        correct = evaluate_categorical(task, model, tokenizer, device, batches, bar)
    elif task.eval_type == "generative":
        correct, samples = evaluate_generative(task, tokenizer, engine, batches, num_samples, max_new_tokens,
                                               temperature, top_k, bar)
    else:
        raise PicochatError(f"task {label} has eval_type {task.eval_type!r}, not categorical or generative")
    bar.close()
    counts = torch.tensor([correct, mine], dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized() and world > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return {"accuracy": correct / total, "correct": correct, "total": total, "seconds": time.time() - t0,
            "max_problems": max_problems, "task_size": len(task), "samples": samples}


def chatcore(results: dict, capped: bool):
    """(name, key, value) of the mean centered accuracy of the ChatCORE tasks in results ({task
    name: evaluate_task's dict}), or None when there is none of them. capped: whether any of them
    ran on fewer problems than it has. "ChatCORE" (key "chatcore") only for all five in full;
    otherwise e.g. "ChatCORE (partial: 3/5 tasks, at most 100 problems per task)" with key
    "chatcore_partial_3of5_max100"; per-task caps come from the results' max_problems."""
    names = [n for n in CHATCORE_TASKS if n in results]
    if not names:
        return None
    value = sum(centered(results[n]["accuracy"], TASKS[n].baseline) for n in names) / len(names)
    if len(names) == len(CHATCORE_TASKS) and not capped:
        return "ChatCORE", "chatcore", value
    parts, key = [], "chatcore_partial"
    if len(names) < len(CHATCORE_TASKS):
        parts.append(f"{len(names)}/{len(CHATCORE_TASKS)} tasks")
        key += f"_{len(names)}of{len(CHATCORE_TASKS)}"
    if capped:
        by_cap = {}
        for n in names:
            if results[n].get("max_problems") is not None:
                by_cap.setdefault(results[n]["max_problems"], []).append(n)
        if len(by_cap) == 1 and len(next(iter(by_cap.values()))) == len(names):
            [cap] = by_cap
            parts.append(f"at most {cap} problems per task")
            key += f"_max{cap}"
        elif by_cap:  # e.g. chat-sft's: the categorical tasks in full, the generative ones capped
            for cap, capped_names in sorted(by_cap.items()):
                parts.append(f"at most {cap} problems of {', '.join(capped_names)}")
                key += f"_max{cap}on{len(capped_names)}"
        else:
            parts.append("capped")
            key += "_capped"
    return f"ChatCORE (partial: {', '.join(parts)})", key, value


def format_table(results: dict, metric=None) -> str:
    """One row per task (accuracy, centered accuracy where the baseline is known, counts, time),
    then the row of metric, a (name, key, value) from chatcore, if given."""
    width = max([len("Task"), *map(len, results), len(metric[0]) if metric else 0])
    lines = [f"{'Task':<{width}} {'Accuracy':>9} {'Centered':>9} {'Correct':>13} {'Seconds':>8}"]
    for name, r in results.items():
        centered_text = f"{centered(r['accuracy'], TASKS[name].baseline):>9.4f}" if name in TASKS else f"{'-':>9}"
        counts = f"{r['correct']}/{r['total']}"
        lines.append(f"{name:<{width}} {r['accuracy']:>9.4f} {centered_text} {counts:>13} {r['seconds']:>8.1f}")
    if metric:
        lines.append(f"{metric[0]:<{width}} {'':>9} {metric[2]:>9.4f}")
    return "\n".join(lines)
