"""Bits per byte: the validation loss normalised by the bytes of text it covers, so
models with different tokenizers (vocab sizes) can be compared on the same data."""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of per-token losses (nats) over targets that stand for real bytes, divided by
    ln 2 times the number of those bytes. Special tokens (token_bytes 0, e.g. BOS) and
    ignored targets (< 0) contribute neither loss nor bytes. Both sums are all-reduced
    across ranks; inf when no bytes were seen. The nats are summed in float64 where the reference
    sums in float32: our one deliberate difference from it (about 2e-8 relative on a full eval),
    kept because float32 loses digits over tens of millions of tokens."""
    total_nats = total_bytes = None
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        losses = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        # where() rather than a multiply: a masked-out loss may be nan/inf for an ignored target
        nats = torch.where(counted, losses.float(), 0.0).sum()
        if total_nats is None:
            # float64 accumulators (MPS has no float64): tens of millions of tokens are summed
            acc = torch.float32 if y.device.type == "mps" else torch.float64
            total_nats = torch.zeros((), dtype=acc, device=y.device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=y.device)
        total_nats += nats
        total_bytes += nbytes.sum()
    if total_nats is None:
        return float("inf")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    total_nats, total_bytes = total_nats.item(), total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)
