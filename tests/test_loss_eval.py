"""Bits per byte on hand-computed examples, and summed across ranks."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from picochat.loss_eval import evaluate_bpb

# token 0 is a special token (0 bytes); tokens 1, 2, 3 stand for 2, 1 and 4 bytes
TOKEN_BYTES = torch.tensor([0, 2, 1, 4], dtype=torch.int32)


class FixedModel(torch.nn.Module):
    """Predicts p = (1/8, 1/8, 1/4, 1/2) everywhere: a target costs 3, 3, 2 or 1 bits."""

    def __init__(self, nan_when_ignored=False):
        super().__init__()
        self.logits = torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0]))
        self.nan_when_ignored = nan_when_ignored

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.logits.expand(*idx.shape, 4)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        if self.nan_when_ignored:
            loss = torch.where(targets.reshape(-1) < 0, float("nan"), loss)
        return loss


def batch(y):
    y = torch.tensor(y)
    return torch.zeros_like(y), y


# counted targets 1, 2, 3, 3, 1: 3+2+1+1+3 = 10 bits over 2+1+4+4+2 = 13 bytes (the BOS targets 0 and -1 excluded)
B1 = batch([[1, 2, 0, -1], [3, 3, 1, 0]])
# counted targets 2, 2: 4 bits over 2 bytes
B2 = batch([[2, 2, -1, -1], [0, 0, 0, 0]])


@pytest.mark.parametrize("nan_when_ignored", [False, True])
def test_hand_computed(nan_when_ignored):
    model = FixedModel(nan_when_ignored)
    assert evaluate_bpb(model, [B1, B2], 1, TOKEN_BYTES) == pytest.approx(10 / 13, rel=1e-6)
    assert evaluate_bpb(model, iter([B1, B2]), 2, TOKEN_BYTES) == pytest.approx(14 / 15, rel=1e-6)


def test_no_bytes_is_inf():
    model = FixedModel()
    assert evaluate_bpb(model, [batch([[0, -1], [-1, 0]])], 1, TOKEN_BYTES) == math.inf
    assert evaluate_bpb(model, [], 0, TOKEN_BYTES) == math.inf


def test_matches_slow_computation_on_a_random_model():
    V, g = 50, torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g)
    token_bytes = torch.randint(0, 5, (V,), generator=g, dtype=torch.int32)

    class Bigram(torch.nn.Module):
        def forward(self, idx, targets=None, loss_reduction="mean"):
            return F.cross_entropy(table[idx].reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                                   reduction=loss_reduction)

    batches = [(torch.randint(0, V, (3, 7), generator=g), torch.randint(-1, V, (3, 7), generator=g)) for _ in range(4)]
    nats = nbytes = 0.0
    for x, y in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            if yi >= 0 and token_bytes[yi] > 0:
                nats += -torch.log_softmax(table[xi], dim=-1)[yi].item()
                nbytes += token_bytes[yi].item()
    expected = nats / (math.log(2) * nbytes)
    assert evaluate_bpb(Bigram(), batches, 4, token_bytes) == pytest.approx(expected, rel=1e-6)


def _rank_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = [B1] if rank == 0 else [B2]  # each rank sees its own batches
        results[rank] = evaluate_bpb(FixedModel(), mine, 1, TOKEN_BYTES)
    finally:
        dist.destroy_process_group()


def test_sums_across_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(free_port(), results), nprocs=2)
        assert results[0] == results[1] == pytest.approx(14 / 15, rel=1e-6)
