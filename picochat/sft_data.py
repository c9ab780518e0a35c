"""SFT batches: rendered conversations packed into rows, BOS-aligned best fit with padding.

Rank r of W takes conversations r, r+W, r+2W, ... of the dataset (wrapping around, counting
epochs from 1) into a buffer of 100. Every row holds T+1 tokens and is filled by repeatedly
taking the LARGEST buffered conversation that still fits whole; when none fits, the rest of the
row is padding (BOS, trained on never) and the row is done. Conversations are never cropped to
fit a row. Targets are -1 wherever the conversation's mask is 0 (user turns, tool outputs,
padding), so only what the assistant says is trained on.

Beyond the reference: a conversation longer than a row is rendered truncated to T+1 tokens (and
trained on); the reference keeps it in the buffer forever when --max-seq-len is short. Resume is
exact: state_dict() holds the cursor, the epoch and the buffered conversations' indices.
"""

import torch

from picochat.common import PicochatError

BUFFER_SIZE = 100


class SFTLoader:
    def __init__(self, tokenizer, dataset, batch_size: int, seq_len: int, device, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise PicochatError("the SFT data has no conversations")
        self.tokenizer, self.dataset = tokenizer, dataset
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, device
        self.rank, self.world_size = rank, world_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch = rank, 1  # the next conversation this rank takes, and its epoch
        self.buffer = []  # (dataset index, ids, mask), in arrival order
        self.packed = 0  # conversations this rank has put into rows
        self.packed_before = 0  # ... before the latest batch

    def render(self, index: int):
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.seq_len + 1)
        return index, ids, mask

    def refill(self):
        while len(self.buffer) < BUFFER_SIZE:
            self.buffer.append(self.render(self.cursor))
            self.cursor += self.world_size
            if self.cursor >= len(self.dataset):
                self.cursor -= len(self.dataset)
                self.epoch += 1

    def progress(self) -> float:
        """Epochs in the batches handed out so far, fractional (1.0 = the whole dataset once, over
        all ranks): counted in conversations packed into rows, not read into the buffer."""
        return self.packed * self.world_size / len(self.dataset)

    def progress_before_latest(self) -> float:
        """progress() without the latest batch: what a loop that holds that batch, not yet trained
        on, has trained. Stopping when this reaches 1 trains on every conversation of the epoch."""
        return self.packed_before * self.world_size / len(self.dataset)

    def next_row(self):
        """(ids, mask) of one row of T+1 tokens."""
        ids, mask, space = [], [], self.seq_len + 1
        while True:
            self.refill()
            fits = [i for i, (_, conv_ids, _) in enumerate(self.buffer) if len(conv_ids) <= space]
            if not fits:
                break
            best = max(fits, key=lambda i: len(self.buffer[i][1]))  # the first of the longest
            _, conv_ids, conv_mask = self.buffer.pop(best)
            self.packed += 1
            ids += conv_ids
            mask += conv_mask
            space -= len(conv_ids)
        return ids + [self.bos] * space, mask + [0] * space

    def __iter__(self):
        return self

    def __next__(self):
        self.packed_before = self.packed
        rows = [self.next_row() for _ in range(self.batch_size)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        return ids[:, :-1].to(self.device), targets.to(self.device)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "packed": self.packed, "packed_before": self.packed_before,
                "buffer": [index for index, _, _ in self.buffer],
                "rank": self.rank, "world_size": self.world_size, "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict):
        if (state["rank"], state["world_size"], state["dataset_size"]) != (self.rank, self.world_size,
                                                                         len(self.dataset)):
            raise PicochatError(f"the SFT data position was saved for rank {state['rank']} of {state['world_size']} "
                                f"over {state['dataset_size']:,} conversations; this is rank {self.rank} of "
                                f"{self.world_size} over {len(self.dataset):,}: resume with the same data and world")
        self.cursor, self.epoch = state["cursor"], state["epoch"]
        self.packed, self.packed_before = state["packed"], state["packed_before"]
        self.buffer = [self.render(index) for index in state["buffer"]]

    def position(self) -> str:
        return f"{self.packed_before:,} conversations trained"
