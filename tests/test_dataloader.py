"""The pretraining loader: best-fit packing against a slow linear-scan version,
packed rows against the documents tokenized one by one, rank sharding, exact
resume, epochs and errors. Real tokenizer, real text."""

import json
import pickle
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.common import PicochatError
from picochat.dataloader import BestFitBuffer, DataLoader, fill_row

# ---------------------------------------------------------------------------
# Helpers


def encode_one_by_one(tokenizer, texts):
    bos = tokenizer.get_bos_token_id()
    return [[bos] + tokenizer.encode(text) for text in texts]


def full_rows(inputs, targets):
    """The (B, T+1) rows a batch was cut from, after checking targets are inputs shifted by one."""
    assert inputs.shape == targets.shape and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def segments(row, bos):
    """A row cut at every BOS; the row must start with one."""
    assert row[0] == bos
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def slow_best_fit(docs, buffer_size, capacity, num_rows):
    """nanochat's packing, written as plainly as possible: refill one document at a time
    before every pick, linear scans, first found wins ties."""
    stream, buffer, rows = iter(docs), [], []
    for _ in range(num_rows):
        row = []
        while len(row) < capacity:
            while len(buffer) < buffer_size:
                buffer.append(next(stream))
            space = capacity - len(row)
            fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
            if fitting:
                pick = max(fitting, key=lambda i: len(buffer[i]))
            else:
                pick = min(range(len(buffer)), key=lambda i: len(buffer[i]))
            row += buffer.pop(pick)[:space]
        rows.append(row)
    return rows


def fast_best_fit(docs, buffer_size, capacity, num_rows):
    stream, buffer = iter(enumerate(docs)), BestFitBuffer()

    def refill():
        while len(buffer) < buffer_size:
            i, doc = next(stream)
            buffer.add(np.array(doc), i)

    rows = np.zeros((num_rows, capacity), dtype=np.int64)
    for row in rows:
        fill_row(row, buffer, refill)
    return rows.tolist()


# ---------------------------------------------------------------------------
# A small dataset of real text in a layout with several files and uneven row groups

TRAIN_LAYOUT = {"a.parquet": [5, 5, 5, 5, 3], "b.parquet": [5, 5], "c.parquet": [4, 4, 4]}
VAL_LAYOUT = {"d.parquet": [5, 5]}


@pytest.fixture(scope="module")
def layout_dir(pretrain_dir, tmp_path_factory):
    """Returns (folder, {file: [[texts of row group 0], ...]}). Documents are real shard text cut
    to 40..600 characters, so rows of T=128 hold a few whole documents and crops."""
    source = pq.read_table(pretrain_dir / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    folder = tmp_path_factory.mktemp("layout")
    contents, i = {}, 0
    for name, sizes in {**TRAIN_LAYOUT, **VAL_LAYOUT}.items():
        groups = []
        with pq.ParquetWriter(folder / name, pa.schema([("text", pa.string())])) as writer:
            for size in sizes:
                texts = [source[i + j][:40 + (97 * (i + j)) % 560] for j in range(size)]
                i += size
                writer.write_table(pa.table({"text": texts}))
                groups.append(texts)
        contents[name] = groups
    for name, sizes in contents.items():  # the layout really is what the test assumes
        assert pq.ParquetFile(folder / name).num_row_groups == len(sizes)
    return folder, contents


def stream_order(contents, files, rank, world_size):
    """(file, row group, row) of every document rank reads in one epoch, in order."""
    return [(name, rg, row) for name in files for rg in range(rank, len(contents[name]), world_size)
            for row in range(len(contents[name][rg]))]


# ---------------------------------------------------------------------------
# Packing core


def test_best_fit_hand_example():
    buffer = BestFitBuffer()
    docs = {"a5": [1] * 5, "b3": [2] * 3, "c7": [3] * 7, "d3": [4] * 3, "e2": [5] * 2}
    for name, tokens in docs.items():
        buffer.add(np.array(tokens), name)
    rows = np.zeros((2, 10), dtype=np.int64)
    # row 0: largest that fits 10 is c7; 3 left: b3 and d3 tie, the older b3 goes
    assert fill_row(rows[0], buffer, lambda: None) == 0
    assert rows[0].tolist() == [3] * 7 + [2] * 3
    # row 1: a5, then 5 left: d3, then 2 left: e2
    assert fill_row(rows[1], buffer, lambda: None) == 0
    assert rows[1].tolist() == [1] * 5 + [4] * 3 + [5] * 2
    assert len(buffer) == 0
    # nothing fits: the shortest (oldest of the equal shortest) is cropped, the rest thrown away
    for name, n in [("f12", 12), ("g15", 15), ("h12", 12)]:
        buffer.add(np.arange(n) + 100 * n, name)
    row = np.zeros(10, dtype=np.int64)
    assert fill_row(row, buffer, lambda: None) == 2
    assert row.tolist() == list(range(1200, 1210))
    assert buffer.keys() == ["g15", "h12"]


def test_best_fit_matches_slow_linear_scan():
    rng = random.Random(0)
    for trial in range(30):
        capacity = rng.choice([4, 17, 65])
        docs = [[1000 * d + t for t in range(rng.randint(1, 2 * capacity))] for d in range(4000)]
        buffer_size = rng.choice([1, 3, 16, 100])
        fast = fast_best_fit(docs, buffer_size, capacity, num_rows=40)
        assert fast == slow_best_fit(docs, buffer_size, capacity, num_rows=40), f"trial {trial}"


# ---------------------------------------------------------------------------
# Packing real documents


def test_rows_are_whole_documents_then_one_prefix(small_tokenizer, pretrain_dir):
    bos = small_tokenizer.get_bos_token_id()
    texts = pq.read_table(pretrain_dir / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    docs = encode_one_by_one(small_tokenizer, texts)
    whole = {tuple(d) for d in docs}
    by_start = {}
    for d in docs:
        by_start.setdefault(tuple(d[:3]), []).append(d)

    loader = DataLoader(small_tokenizer, 4, 1024, "train", pretrain_dir, "cpu", rank=0, world_size=1,
                        buffer_size=64, tokenizer_batch_size=16)
    placed = crops = multi_doc_rows = 0
    for _ in range(12):
        inputs, targets = next(loader)
        assert inputs.shape == (4, 1024) and inputs.device.type == "cpu"
        for row in full_rows(inputs, targets):
            pieces = segments(row, bos)
            assert sum(map(len, pieces)) == 1025  # no padding: every token belongs to a document
            for piece in pieces[:-1]:
                assert tuple(piece) in whole
            last = pieces[-1]
            assert any(d[:len(last)] == last for d in by_start.get(tuple(last[:3]), docs))
            crops += tuple(last) not in whole
            placed += len(pieces)
            multi_doc_rows += len(pieces) > 1
    # both kinds of placement happened, and the loader counted what the crops threw away
    assert crops > 0 and multi_doc_rows > 0 and placed > 48
    assert loader.tokens_discarded > 0


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_their_row_groups_in_order_across_epochs(small_tokenizer, layout_dir, world_size):
    """With a one-document buffer every pick is the next document of the stream, so the rows
    spell out the stream itself: rank r reads row groups r, r+W, ... of each file, in order,
    then starts over (epoch 2)."""
    folder, contents = layout_dir
    bos = small_tokenizer.get_bos_token_id()
    tokens = {(name, rg, row): [bos] + small_tokenizer.encode(text)
              for name, groups in contents.items() for rg, texts in enumerate(groups) for row, text in enumerate(texts)}
    epochs = {}
    for rank in range(world_size):
        order = stream_order(contents, list(TRAIN_LAYOUT), rank, world_size)
        expected = order * 3
        loader = DataLoader(small_tokenizer, 2, 63, "train", folder, "cpu", rank=rank, world_size=world_size,
                            buffer_size=1, tokenizer_batch_size=1)
        seen, positions = [], []
        while len(seen) < 2 * len(order) + 1:
            for row in full_rows(*next(loader)):
                pieces = segments(row, bos)
                for i, piece in enumerate(pieces):
                    want = tokens[expected[len(seen)]]
                    assert piece == want[:len(piece)]
                    assert i == len(pieces) - 1 or len(piece) == len(want)
                    seen.append(expected[len(seen)])
            positions.append(loader.position())
        assert positions[0] == f"epoch 1 pq 0 rg {rank}"
        assert positions[-1].startswith("epoch 3")
        epochs[rank] = set(order)
    # the ranks split the documents: disjoint, and together everything one rank alone reads
    everything = set(stream_order(contents, list(TRAIN_LAYOUT), 0, 1))
    assert set().union(*epochs.values()) == everything
    assert sum(len(s) for s in epochs.values()) == len(everything)


def test_real_shard_row_groups_split_between_two_ranks(small_tokenizer, pretrain_dir):
    """shard_00000 has two row groups: rank 0 of 2 packs documents of the first only, rank 1 of the second."""
    bos = small_tokenizer.get_bos_token_id()
    pf = pq.ParquetFile(pretrain_dir / "shard_00000.parquet")
    groups = [{tuple(d) for d in encode_one_by_one(small_tokenizer, pf.read_row_group(rg).column("text").to_pylist())}
              for rg in range(2)]
    for rank in range(2):
        loader = DataLoader(small_tokenizer, 4, 2048, "train", pretrain_dir, "cpu", rank=rank, world_size=2,
                            buffer_size=32)
        whole = [tuple(p) for _ in range(3) for row in full_rows(*next(loader)) for p in segments(row, bos)[:-1]]
        assert len(whole) > 10
        assert all(d in groups[rank] and d not in groups[1 - rank] for d in whole)


def test_rank_and_world_size_default_to_torchrun_environment(small_tokenizer, pretrain_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = DataLoader(small_tokenizer, 2, 64, "train", pretrain_dir, "cpu", buffer_size=4)
    next(loader)
    state = loader.state_dict()
    assert (state["rank"], state["world_size"]) == (1, 2)
    assert loader.position() == "epoch 1 pq 0 rg 1"


def test_val_split_reads_only_the_last_file(small_tokenizer, pretrain_dir):
    bos = small_tokenizer.get_bos_token_id()
    read = lambda name: pq.read_table(pretrain_dir / name, columns=["text"]).column("text").to_pylist()
    val = {tuple(d) for d in encode_one_by_one(small_tokenizer, read("shard_00001.parquet"))}
    loader = DataLoader(small_tokenizer, 4, 2048, "val", pretrain_dir, torch.device("cpu"), rank=0, world_size=1,
                        buffer_size=16)
    whole = [tuple(p) for _ in range(10) for row in full_rows(*next(loader)) for p in segments(row, bos)[:-1]]
    assert len(whole) > 40 and all(d in val for d in whole)
    # 131 documents: ten batches of 4 x 2049 tokens have gone through more than one epoch
    assert loader.position().startswith("epoch 2 pq 0 rg 0")
    assert loader.state_dict()["file"] == "shard_00001.parquet"


def test_yielded_batches_are_not_overwritten(small_tokenizer, pretrain_dir):
    loader = DataLoader(small_tokenizer, 2, 64, "val", pretrain_dir, "cpu", rank=0, world_size=1, buffer_size=4)
    first = next(loader)
    kept = [t.clone() for t in first]
    second = next(loader)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert not torch.equal(first[0], second[0])


# ---------------------------------------------------------------------------
# Exact resume


def run_and_snapshot(make_loader, steps):
    loader = make_loader()
    batches, states, positions = [], [], []
    for _ in range(steps):
        state = loader.state_dict()
        assert json.loads(json.dumps(state)) == state  # plain data
        states.append(pickle.loads(pickle.dumps(state)))
        positions.append(loader.position())
        batches.append(next(loader))
    return batches, states, positions


def check_resume(make_loader, batches, states, positions, k, n=20):
    fresh = make_loader()
    fresh.load_state_dict(states[k])
    assert fresh.state_dict() == states[k]
    assert fresh.position() == positions[k]
    for j in range(n):
        inputs, targets = next(fresh)
        assert torch.equal(inputs, batches[k + j][0]) and torch.equal(targets, batches[k + j][1]), (k, j)


def epoch_boundary(positions):
    """Index of the first snapshot taken in epoch 2."""
    return next(i for i, p in enumerate(positions) if p.startswith("epoch 2"))


def test_exact_resume_on_the_real_val_shard(small_tokenizer, pretrain_dir):
    make = lambda: DataLoader(small_tokenizer, 4, 256, "val", pretrain_dir, "cpu", rank=0, world_size=1,
                              buffer_size=24, tokenizer_batch_size=10)
    batches, states, positions = run_and_snapshot(make, 70)
    b = epoch_boundary(positions)
    assert b < 45
    for k in [0, 1, 5, b - 2, b, b + 3]:
        check_resume(make, batches, states, positions, k)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_exact_resume_across_files_and_epochs(small_tokenizer, layout_dir, rank, world_size):
    folder, _ = layout_dir
    make = lambda: DataLoader(small_tokenizer, 2, 128, "train", folder, "cpu", rank=rank, world_size=world_size,
                              buffer_size=6, tokenizer_batch_size=4)
    batches, states, positions = run_and_snapshot(make, 60)
    b = epoch_boundary(positions)
    assert b < 38
    assert {s["pq_idx"] for s in states} == {0, 1, 2}
    for k in [0, 3, b - 1, b + 1]:
        check_resume(make, batches, states, positions, k)
    # a snapshot taken mid row group, with buffered documents from more than one row group
    k = next(i for i, s in enumerate(states[:b]) if s["doc_idx"] > 0 and len(s["buffer"]) > 1)
    check_resume(make, batches, states, positions, k)


def test_state_is_compact(small_tokenizer, pretrain_dir):
    loader = DataLoader(small_tokenizer, 2, 512, "train", pretrain_dir, "cpu", rank=0, world_size=1)
    next(loader)
    state = loader.state_dict()
    assert sum(len(docs) for _, _, docs in state["buffer"]) >= 1000
    assert len(pickle.dumps(state)) < 8000


# ---------------------------------------------------------------------------
# Errors


def test_bad_arguments_are_clear_errors(small_tokenizer, pretrain_dir):
    make = lambda **kw: DataLoader(small_tokenizer, **{"batch_size": 2, "seq_len": 64, "split": "train",
                                                       "data_dir": pretrain_dir, "device": "cpu", "rank": 0,
                                                       "world_size": 1, **kw})
    with pytest.raises(PicochatError, match="split"):
        make(split="test")
    with pytest.raises(PicochatError, match="seq_len"):
        make(seq_len=0)
    with pytest.raises(PicochatError, match="buffer_size"):
        make(buffer_size=0)
    with pytest.raises(PicochatError, match="rank 2"):
        make(rank=2, world_size=2)
    # the val shard has a single row group, so a second rank would get nothing
    with pytest.raises(PicochatError, match="rank 1 of 2 would get no data"):
        make(split="val", rank=1, world_size=2)
    with pytest.raises(PicochatError, match="does not exist"):
        make(data_dir=pretrain_dir / "missing")


def test_corrupt_parquet_names_the_file(small_tokenizer, pretrain_dir, tmp_path):
    shutil.copy(pretrain_dir / "shard_00001.parquet", tmp_path / "shard_00001.parquet")
    (tmp_path / "shard_00000.parquet").write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    with pytest.raises(PicochatError, match="shard_00000.parquet"):
        DataLoader(small_tokenizer, 2, 64, "train", tmp_path, "cpu", rank=0, world_size=1)


def test_mismatched_states_are_refused(small_tokenizer, layout_dir):
    folder, _ = layout_dir
    make = lambda rank: DataLoader(small_tokenizer, 2, 64, "train", folder, "cpu", rank=rank, world_size=2,
                                   buffer_size=4)
    loader = make(0)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(PicochatError, match="rank=0"):
        make(1).load_state_dict(state)
    with pytest.raises(PicochatError, match="not a data loader state"):
        make(0).load_state_dict({"pq_idx": 0})
    bad = json.loads(json.dumps(state))
    bad["buffer"][0][2][0] = 99
    with pytest.raises(PicochatError, match="row 99"):
        make(0).load_state_dict(bad)
    bad = json.loads(json.dumps(state))
    bad["buffer"][0][1] = 1  # row group 1 belongs to rank 1
    with pytest.raises(PicochatError, match="does not read"):
        make(0).load_state_dict(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(small_tokenizer, pretrain_dir):
    make = lambda device: DataLoader(small_tokenizer, 4, 256, "val", pretrain_dir, device, rank=0, world_size=1,
                                     buffer_size=16)
    on_cpu, on_gpu = make("cpu"), make(torch.device("cuda"))
    assert on_gpu.staging.is_pinned()
    for _ in range(5):
        (x, y), (gx, gy) = next(on_cpu), next(on_gpu)
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
