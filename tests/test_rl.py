"""picochat.rl against hand-computed values: padding and targets, group advantages, the
policy-gradient loss's normalisation and gradient, zero gradient for prompt, tool-forced and
padding tokens, and pass@k counting."""

import math

import pytest
import torch
import torch.nn.functional as F

from picochat.rl import Group, group_advantages, pad_rollouts, pass_at_k, policy_gradient_backward, sample_seed

V = 4  # the toy vocabulary


class Uniform(torch.nn.Module):
    """Logits = one bias vector at every position: at bias 0 every token has logp = -ln 4, and
    d logp(t) / d bias_v = [v == t] - 1/4, so objectives and gradients are computed by hand."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(V))

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = self.bias.expand(*idx.shape, V)
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)


class PerPosition(torch.nn.Module):
    """Logits that are a free parameter per (row, position): the gradient says which positions'
    predictions the loss depends on."""

    def __init__(self, rows, width):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(rows, width, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = self.logits[:idx.shape[0], :idx.shape[1]]
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)


def group(sequences, masks, rewards, pad=0):
    inputs, targets = pad_rollouts(sequences, masks, pad)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return Group(inputs, targets, rewards, group_advantages(rewards), [])


# Group A: row 0 = prompt 3, sampled 1, tool-forced 2, sampled 2; row 1 = prompt 3, sampled 1.
A = ([[3, 1, 2, 2], [3, 1]], [[0, 1, 0, 1], [0, 1]], [1.0, 0.0])
# Group B: longer rows, 4 target tokens
B = ([[3, 3, 1, 1, 1], [3, 3, 2]], [[0, 0, 1, 1, 1], [0, 0, 1]], [1.0, 0.0])
# Group C: B's rows with equal rewards
C = (*B[:2], [1.0, 1.0])


def test_padding_and_targets():
    inputs, targets = pad_rollouts(*A[:2], pad_token=9)
    assert inputs.tolist() == [[3, 1, 2], [3, 1, 9]]
    # targets: the next token where its mask is 1; the forced 2 and the padding are -1
    assert targets.tolist() == [[1, -1, 2], [1, -1, -1]]


def test_advantages_are_reward_minus_group_mean():
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(torch.tensor([0.2, 0.5, 0.8])).tolist() == pytest.approx([-0.3, 0.0, 0.3])
    same = group_advantages(torch.tensor([1.0, 1.0, 1.0]))
    assert same.tolist() == [0.0, 0.0, 0.0] and not same.isnan().any()


def test_loss_normalisation_and_gradient_by_hand():
    """Two groups of unequal lengths, one pass each (batch 2), examples = 2; logp = -ln4 everywhere.
    Group A: advantages +-0.5, 3 target tokens (the forced one left out): objective
    (0.5 * 2 * -ln4 - 0.5 * 1 * -ln4) / (3 tokens * 1 pass * 2 examples) = -ln4 / 12.
    Group B: advantages +-0.5, 4 target tokens: (0.5 * 3 * -ln4 - 0.5 * 1 * -ln4) / (4 * 1 * 2) = -ln4 / 8.
    Group C, equal rewards: objective 0, no gradient, no NaN. Gradients add up over the groups."""
    model = Uniform()
    objective_a = policy_gradient_backward(model, group(*A), batch_size=2, examples=2, scaler=None)
    assert objective_a == pytest.approx(-math.log(4) / 12)
    # d objective / d bias_v = sum over targets adv * ([v == t] - 1/4) / 6 = (0.5 [v == 2] - 0.125) / 6;
    # the loss is -objective
    grad_a = torch.tensor([0.125, 0.125, -0.375, 0.125]) / 6
    assert model.bias.grad.tolist() == pytest.approx(grad_a.tolist())
    objective_b = policy_gradient_backward(model, group(*B), batch_size=2, examples=2, scaler=None)
    assert objective_b == pytest.approx(-math.log(4) / 8)
    # group B: -(1.5 (e1 - 1/4) - 0.5 (e2 - 1/4)) / 8
    grad_b = torch.tensor([0.25, -1.25, 0.75, 0.25]) / 8
    assert model.bias.grad.tolist() == pytest.approx((grad_a + grad_b).tolist())
    before = model.bias.grad.clone()
    objective_c = policy_gradient_backward(model, group(*C), batch_size=2, examples=2, scaler=None)
    assert objective_c == 0.0 and torch.equal(model.bias.grad, before) and not before.isnan().any()


def test_passes_are_normalised_each_by_its_own_tokens():
    """Group A in passes of one row: pass 1 (row 0, 2 targets, adv 0.5), pass 2 (row 1, 1 target, adv
    -0.5); objective = (0.5 * 2 * -ln4 / 2 - 0.5 * 1 * -ln4 / 1) / (2 passes * 1 example) = 0."""
    model = Uniform()
    objective = policy_gradient_backward(model, group(*A), batch_size=1, examples=1, scaler=None)
    assert objective == pytest.approx(0.0, abs=1e-7)
    # gradient: (0.5 (e1 + e2 - 1/2) / 2 - 0.5 (e1 - 1/4)) / 2, negated
    expected = -(0.25 * (torch.eye(V)[1] + torch.eye(V)[2] - 0.5) - 0.5 * (torch.eye(V)[1] - 0.25)) / 2
    assert model.bias.grad.tolist() == pytest.approx(expected.tolist())


def test_prompt_forced_and_padding_tokens_get_no_gradient():
    """The gradient of the loss with respect to the logits predicting each position: zero exactly
    where the predicted token is prompt, tool output or padding, nonzero where it was sampled."""
    sequences = [[3, 3, 1, 0, 2, 2, 1], [3, 3, 2]]
    masks = [[0, 0, 1, 1, 0, 0, 1], [0, 0, 1]]  # row 0: prompt, 2 sampled, 2 forced, 1 sampled
    g = group(sequences, masks, [1.0, 0.0])
    model = PerPosition(2, 6)
    policy_gradient_backward(model, g, batch_size=2, examples=1, scaler=None)
    nonzero = (model.logits.grad.abs().sum(-1) > 0).int().tolist()
    # logits at position p predict token p + 1
    assert nonzero == [[0, 1, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]]


class Scripted:
    """An engine stand-in for pass_at_k's counting: per problem, which samples are right."""

    def __init__(self, right: dict):
        from types import SimpleNamespace

        self.right = right
        self.tokenizer = SimpleNamespace(render_for_completion=lambda conversation: [conversation["id"]],
                                         decode=lambda tokens: "yes" if tokens[0] else "no")
        self.calls = []

    def generate_batch(self, prompt, n, seed, **kwargs):
        problem = prompt[0]
        done = sum(len(c) for p, c, _ in self.calls if p == problem)
        self.calls.append((problem, [None] * n, seed))
        sequences = [prompt + [int(ok)] for ok in self.right[problem][done:done + n]]
        return sequences, [[0, 1]] * len(sequences)


class Answers:
    def __getitem__(self, i):
        return {"id": i}

    def reward(self, conversation, completion):
        return float(completion == "yes")


def test_pass_at_k_counts():
    """Problem 0 first right at sample 3, problem 1 at sample 1, problem 2 never: pass@1 = 1,
    pass@2 = 1, pass@3 = pass@4 = 2 problems; samples come in batches of 3 with seeds of their own."""
    engine = Scripted({0: [0, 0, 1, 1], 1: [1, 0, 0, 0], 2: [0, 0, 0, 0]})
    solved = pass_at_k(engine, Answers(), [0, 1, 2], k=4, batch_size=3, max_new_tokens=5, temperature=1.0,
                       top_k=None)
    assert solved.tolist() == [1, 1, 2, 2]
    assert [(p, len(c)) for p, c, _ in engine.calls] == [(0, 3), (0, 1), (1, 3), (1, 1), (2, 3), (2, 1)]
    assert engine.calls[0][2] == sample_seed(-1, 0, 0) != engine.calls[1][2] == sample_seed(-1, 0, 1)


def test_sample_seeds_are_fixed_numbers():
    # the same in every process and Python run: tuples of ints hash without a salt
    assert sample_seed(3, 17, 1) == hash((3, 17, 1)) & 0x7FFFFFFF
    assert len({sample_seed(s, e, b) for s in range(5) for e in range(5) for b in range(2)}) == 50
