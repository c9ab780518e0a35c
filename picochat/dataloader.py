"""Pretraining batches: BOS-aligned best-fit packing of tokenized documents.

Documents stream from the split's parquet files (files in order; rank r of W reads
row groups r, r+W, r+2W, ... of each file; forever, counting epochs from 1). Each
document is tokenized with BOS in front and no EOS, and waits in a buffer. Every
row holds T+1 tokens (inputs = row[:-1], targets = row[1:]) and is filled by
repeatedly taking the LARGEST buffered document that still fits whole; when none
fits, the SHORTEST one is cropped to the space left and the rest of it is thrown
away. So every row starts with BOS and there is no padding.

Unlike nanochat's loader, resume is exact: state_dict() records where the stream
is and which documents sit in the buffer (by file, row group and row, not by
tokens), and load_state_dict() re-reads and re-tokenizes those documents, so a
restored loader yields exactly the batches the original would have.
"""

import bisect
import itertools
from collections import deque

import numpy as np
import torch

from picochat.common import PicochatError, get_rank, get_world_size
from picochat.dataset import data_dir_for, num_row_groups, read_row_group_texts, split_files


class BestFitBuffer:
    """Buffered documents bucketed by length, so the best fit is one bisect away
    instead of a scan over the buffer. Within a length, documents leave in the
    order they came in (the tie-break of a linear scan over an append-only list)."""

    def __init__(self):
        self.lengths = []  # distinct lengths present, ascending
        self.by_length = {}  # length -> deque of (arrival number, key, tokens), oldest first
        self.count = 0
        self.arrivals = itertools.count()

    def __len__(self):
        return self.count

    def add(self, tokens, key):
        length = len(tokens)
        bucket = self.by_length.get(length)
        if bucket is None:
            bucket = self.by_length[length] = deque()
            bisect.insort(self.lengths, length)
        bucket.append((next(self.arrivals), key, tokens))
        self.count += 1

    def pop_best(self, space: int):
        """Remove and return the tokens of the largest document of length <= space,
        or, when none is that short, of the shortest document (the caller crops it)."""
        i = bisect.bisect_right(self.lengths, space)
        i = i - 1 if i > 0 else 0
        length = self.lengths[i]
        bucket = self.by_length[length]
        tokens = bucket.popleft()[2]
        if not bucket:
            del self.by_length[length]
            del self.lengths[i]
        self.count -= 1
        return tokens

    def keys(self) -> list:
        """Keys of the buffered documents in arrival order."""
        entries = sorted(itertools.chain.from_iterable(self.by_length.values()), key=lambda e: e[0])
        return [key for _, key, _ in entries]


def fill_row(row: np.ndarray, buffer: BestFitBuffer, refill) -> int:
    """Fill row completely from the buffer (refill() tops it up before every pick).
    Returns how many tokens the crop threw away."""
    pos, capacity, discarded = 0, len(row), 0
    while pos < capacity:
        refill()
        tokens = buffer.pop_best(capacity - pos)
        n = min(len(tokens), capacity - pos)
        row[pos:pos + n] = tokens[:n]
        pos += n
        discarded += len(tokens) - n
    return discarded


class DocumentStream:
    """One rank's documents, in order, forever. The cursor (epoch, pq_idx, rg_idx,
    doc_idx) names the next document to hand out; it moves on to the next row group
    only when a chunk is asked for, so it also names the row group read last."""

    def __init__(self, files, rank: int, world_size: int):
        self.files, self.rank, self.world_size = files, rank, world_size
        self.num_row_groups = [num_row_groups(path) for path in files]
        self.rank_row_groups = sum(len(range(rank, n, world_size)) for n in self.num_row_groups)
        if self.rank_row_groups == 0:
            raise PicochatError(f"rank {rank} of {world_size} would get no data: it reads row groups {rank}, "
                                f"{rank}+{world_size}, ... of each file, and no file of the {len(files)} in "
                                f"{files[0].parent} has more than {max(self.num_row_groups)} row group(s); "
                                "use fewer processes or more data")
        self.epoch, self.pq_idx, self.rg_idx, self.doc_idx = 1, 0, rank, 0
        self.skip_short_files()
        self.texts = None  # texts of the cursor's row group, once read

    def skip_short_files(self):
        while self.rg_idx >= self.num_row_groups[self.pq_idx]:
            self.pq_idx, self.rg_idx = self.pq_idx + 1, self.rank
            if self.pq_idx == len(self.files):
                self.pq_idx, self.epoch = 0, self.epoch + 1

    def next_chunk(self, n: int):
        """Up to n documents of one row group: ((pq_idx, rg_idx, first doc_idx), texts)."""
        for _ in range(self.rank_row_groups + 1):
            if self.texts is None:
                self.texts = read_row_group_texts(self.files[self.pq_idx], self.rg_idx)
            if self.doc_idx < len(self.texts):
                break
            self.rg_idx, self.doc_idx, self.texts = self.rg_idx + self.world_size, 0, None
            self.skip_short_files()
        else:
            raise PicochatError(f"the row groups rank {self.rank} of {self.world_size} reads from "
                                f"{self.files[0].parent} are all empty")
        start = self.doc_idx
        chunk = self.texts[start:start + n]
        self.doc_idx += len(chunk)
        return (self.pq_idx, self.rg_idx, start), chunk

    def seek(self, epoch: int, pq_idx: int, rg_idx: int, doc_idx: int):
        self.epoch, self.pq_idx, self.rg_idx, self.doc_idx, self.texts = epoch, pq_idx, rg_idx, doc_idx, None


class DataLoader:
    """Iterator of (inputs, targets), each (batch_size, seq_len) int64 on device.
    Every batch is a fresh tensor pair (nothing yielded is overwritten later)."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str, data_dir, device,
                 rank=None, world_size=None, buffer_size: int = 1000, tokenizer_batch_size: int = 128,
                 tokenizer_threads: int = 4):
        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
        for name, value in [("batch_size", batch_size), ("seq_len", seq_len), ("buffer_size", buffer_size),
                            ("tokenizer_batch_size", tokenizer_batch_size), ("tokenizer_threads", tokenizer_threads),
                            ("world_size", world_size)]:
            if value < 1:
                raise PicochatError(f"data loader {name} must be at least 1 (got {value})")
        if not 0 <= rank < world_size:
            raise PicochatError(f"data loader rank {rank} is outside 0..{world_size - 1}")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.tokenizer_batch_size, self.tokenizer_threads = (
            buffer_size, tokenizer_batch_size, tokenizer_threads)
        self.bos = tokenizer.get_bos_token_id()
        self.files = split_files(data_dir_for(str(data_dir)), split)
        self.stream = DocumentStream(self.files, rank, world_size)
        self.buffer = BestFitBuffer()
        self.tokens_discarded = 0  # thrown away by crops since construction or load_state_dict

        self.rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        self.device = torch.device(device)
        # On an accelerator, [inputs | targets] go up in one copy from one staging buffer,
        # pinned (so the copy can be asynchronous) only where that means something: CUDA.
        self.pinned = self.device.type == "cuda"
        if self.device.type != "cpu":
            self.staging = torch.empty((2, batch_size, seq_len), dtype=torch.long, pin_memory=self.pinned)
        self.copy_done = None  # CUDA event: the staging buffer may be reused once it has fired

    def __iter__(self):
        return self

    def __next__(self):
        for row in self.rows:
            self.tokens_discarded += fill_row(row, self.buffer, self.refill)
        rows = torch.from_numpy(self.rows)
        if self.device.type == "cpu":
            batch = torch.empty((2, self.batch_size, self.seq_len), dtype=torch.long)
        else:
            if self.copy_done is not None:
                self.copy_done.synchronize()
            batch = self.staging
        batch[0].copy_(rows[:, :-1])
        batch[1].copy_(rows[:, 1:])
        if self.device.type != "cpu":
            batch = batch.to(self.device, non_blocking=self.pinned)
            if self.pinned:
                self.copy_done = torch.cuda.Event()
                self.copy_done.record()
        return batch[0], batch[1]

    def refill(self):
        while len(self.buffer) < self.buffer_size:
            (pq_idx, rg_idx, start), texts = self.stream.next_chunk(self.tokenizer_batch_size)
            self.add_documents(pq_idx, rg_idx, range(start, start + len(texts)), texts)

    def add_documents(self, pq_idx, rg_idx, doc_indices, texts):
        token_lists = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        for doc_idx, ids in zip(doc_indices, token_lists):
            self.buffer.add(np.array(ids, dtype=np.int32), (pq_idx, rg_idx, doc_idx))

    def position(self) -> str:
        s = self.stream
        return f"epoch {s.epoch} pq {s.pq_idx} rg {s.rg_idx}"

    # -- exact resume ----------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain data: the stream cursor plus the buffered documents as runs
        [pq_idx, rg_idx, [doc_idx, ...]] in arrival order."""
        runs = []
        for pq_idx, rg_idx, doc_idx in self.buffer.keys():
            if runs and runs[-1][0] == pq_idx and runs[-1][1] == rg_idx:
                runs[-1][2].append(doc_idx)
            else:
                runs.append([pq_idx, rg_idx, [doc_idx]])
        s = self.stream
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                "num_files": len(self.files), "file": self.files[s.pq_idx].name,
                "epoch": s.epoch, "pq_idx": s.pq_idx, "rg_idx": s.rg_idx, "doc_idx": s.doc_idx, "buffer": runs}

    def load_state_dict(self, state: dict):
        self.check_state(state)
        self.stream.seek(state["epoch"], state["pq_idx"], state["rg_idx"], state["doc_idx"])
        self.buffer = BestFitBuffer()
        for pq_idx, rg_idx, doc_indices in state["buffer"]:
            texts = read_row_group_texts(self.files[pq_idx], rg_idx)
            if max(doc_indices) >= len(texts):
                raise PicochatError(f"data loader state names row {max(doc_indices)} of row group {rg_idx} "
                                    f"of {self.files[pq_idx].name}, which has only {len(texts)} rows")
            self.add_documents(pq_idx, rg_idx, doc_indices, [texts[i] for i in doc_indices])
        self.tokens_discarded = 0

    def check_state(self, state: dict):
        try:
            ours = {"split": self.split, "rank": self.rank, "world_size": self.world_size}
            for name, value in ours.items():
                if state[name] != value:
                    raise PicochatError(f"data loader state was saved with {name}={state[name]!r}, "
                                        f"but this loader has {name}={value!r}")
            pq_idx, rg_idx = state["pq_idx"], state["rg_idx"]
            same_files = state["num_files"] == len(self.files) and 0 <= pq_idx < len(self.files)
            if not same_files or state["file"] != self.files[pq_idx].name:
                raise PicochatError(f"data loader state was saved for a {state['split']} split of "
                                    f"{state['num_files']} file(s) reading {state['file']}; the data folder "
                                    f"{self.files[0].parent} has changed since")
            runs = [(p, r) for p, r, _ in state["buffer"]] + [(pq_idx, rg_idx)]
            if any(not 0 <= p < len(self.files) or not 0 <= r < self.stream.num_row_groups[p]
                   or r % self.world_size != self.rank for p, r in runs):
                raise PicochatError("data loader state names row groups this rank does not read")
            if (any(not docs or min(docs) < 0 for _, _, docs in state["buffer"]) or state["doc_idx"] < 0
                    or state["epoch"] < 1):
                raise PicochatError("data loader state has invalid document indices")
        except (KeyError, TypeError, ValueError) as e:
            raise PicochatError(f"not a data loader state ({type(e).__name__}: {e})") from None
