"""Reinforcement learning on a task's reward: rollouts through the engine, group-mean advantages,
the policy-gradient loss, pass@k. chat-rl's loop (picochat/stages/chat_rl.py) is built from these.

The algorithm is the reference's simplified GRPO, which is plain REINFORCE with a baseline: each
prompt gets a group of samples, a sample's advantage is its reward minus the group's mean reward
(no division by the spread), and the objective is sum(logp(token) * advantage) over the sampled
tokens. Fully on-policy (one optimizer step per batch of rollouts), so no importance ratio, no
clipping, no KL term and no reference model.

Which tokens learn: the assistant's sampled tokens only. The prompt, the tokens the tool forced
(its output block) and the padding after a sample ended have target -1: no gradient.
"""

import math
from dataclasses import dataclass

import torch

from picochat.training import backward


def sample_seed(step: int, example: int, batch: int) -> int:
    """The sampling seed of one batch of one example's samples at one step, as the reference
    derives it. Python hashes tuples of ints the same in every process (no PYTHONHASHSEED
    salt), so every rank and every resumed run draws the same samples."""
    return hash((step, example, batch)) & 0x7FFFFFFF


@dataclass
class Group:
    """One prompt's samples, ready for the loss."""
    inputs: torch.Tensor  # (N, L) token ids, padded
    targets: torch.Tensor  # (N, L) next tokens, -1 where there is no gradient
    rewards: torch.Tensor  # (N,) float32
    advantages: torch.Tensor  # (N,) float32
    lengths: list[int]  # generated tokens per sample (forced ones included)


def pad_rollouts(sequences: list[list[int]], masks: list[list[int]], pad_token: int):
    """(inputs, targets) for sequences of different lengths: padded with pad_token at mask 0, shifted
    by one; a target is -1 wherever its token's mask is 0 (prompt, tool output, padding)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_token, dtype=torch.long)
    keep = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        keep[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    targets = ids[:, 1:].clone()
    targets[~keep[:, 1:]] = -1
    return ids[:, :-1].contiguous(), targets


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Reward minus the group's mean. A group whose rewards are all equal gets zeros: nothing to learn
    from it, and no 0/0 (the reference does not divide by the standard deviation either)."""
    return rewards - rewards.mean()


def sample_batches(engine, prompt: list[int], n: int, batch_size: int, seed_of, **sampling):
    """(sequences, masks) of n completions of prompt, generated batch_size at a time, batch b
    seeded by seed_of(b)."""
    sequences, masks = [], []
    for batch in range(math.ceil(n / batch_size)):
        seqs, ms = engine.generate_batch(prompt, min(batch_size, n - batch * batch_size), seed=seed_of(batch),
                                         **sampling)
        sequences += seqs
        masks += ms
    return sequences, masks


@torch.no_grad()
def rollout(engine, task, conversation: dict, step: int, example: int, num_samples: int, batch_size: int,
            max_new_tokens: int, temperature: float, top_k: int | None, device) -> Group:
    """num_samples completions of the conversation's prompt, in batches of batch_size (each with its
    own seed), rewarded by task.reward(conversation, completion text)."""
    tokenizer = engine.tokenizer
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = sample_batches(engine, prompt, num_samples, batch_size, lambda b: sample_seed(step, example, b),
                                      max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    rewards = torch.tensor([task.reward(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences],
                           dtype=torch.float32)
    # padding is <|assistant_end|>, as the reference pads; its mask 0 keeps it out of the loss
    inputs, targets = pad_rollouts(sequences, masks, tokenizer.encode_special("<|assistant_end|>"))
    return Group(inputs.to(device), targets.to(device), rewards.to(device), group_advantages(rewards).to(device),
                 [len(s) - len(prompt) for s in sequences])


def policy_gradient_backward(model, group: Group, batch_size: int, examples: int, scaler) -> float:
    """Backward of -objective for one group, in passes of batch_size sequences. Each pass's
    sum(logp * advantage) is divided by its own number of target tokens (token-level, DAPO-style),
    by the number of passes and by `examples` (the groups of this rank's step), as the reference
    normalises: the step's gradient is then the mean over groups, and under DDP the optimizer's
    average over ranks makes it the mean over every rank's groups. Returns this group's objective."""
    passes = math.ceil(len(group.inputs) / batch_size)
    objective = 0.0
    for k in range(passes):
        rows = slice(k * batch_size, (k + 1) * batch_size)
        inputs, targets = group.inputs[rows], group.targets[rows]
        # the loss of an ignored (-1) target is 0: those tokens contribute nothing
        logp = -model(inputs, targets, loss_reduction="none").view_as(targets)
        valid = (targets >= 0).sum().clamp(min=1)
        pass_objective = (logp * group.advantages[rows, None]).sum() / (valid * passes * examples)
        backward(-pass_objective, scaler)
        objective += pass_objective.item()
    return objective


@torch.no_grad()
def pass_at_k(engine, task, indices, k: int, batch_size: int, max_new_tokens: int, temperature: float,
              top_k: int | None) -> torch.Tensor:
    """For the problems task[i], i in indices: (k,) counts of problems solved by at least one of their
    first 1, 2, ..., k samples. Sampled with seeds of their own, the same at every evaluation."""
    tokenizer = engine.tokenizer
    solved = torch.zeros(k, dtype=torch.long)
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        seqs, _ = sample_batches(engine, prompt, k, batch_size, lambda b, i=i: sample_seed(-1, i, b),
                                 max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        correct = [task.reward(conversation, tokenizer.decode(s[len(prompt):])) > 0 for s in seqs]
        first = next((j for j, ok in enumerate(correct) if ok), None)
        if first is not None:
            solved[first:] += 1
    return solved
