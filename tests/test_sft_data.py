"""SFT packing against hand-built rows, exact resume, truncation of long conversations."""

import torch

from picochat.sft_data import SFTLoader


def conversation(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


DATA = [conversation("Tell me a long story about the river and the mountain village.",
                     "The river ran past the village, and the village watched the river every morning."),
        conversation("Hi", "Hello."),
        conversation("What is the color of the sea in winter?", "Grey, mostly.")]


def rendered(tok):
    return [tok.render_conversation(c) for c in DATA]


def test_rows_by_hand(small_tokenizer):
    """Capacity = longest + shortest + 2: each row takes the longest conversation, then the
    largest that still fits (the shortest), then two BOS of padding with mask 0."""
    tok = small_tokenizer
    (ids0, mask0), (ids1, mask1), (ids2, mask2) = rendered(tok)
    lengths = [len(ids0), len(ids1), len(ids2)]
    assert lengths[0] > lengths[2] > lengths[1] + 2  # the layout below needs this order
    T = lengths[0] + lengths[1] + 2 - 1  # rows of T + 1 tokens
    loader = SFTLoader(tok, DATA, batch_size=2, seq_len=T, device="cpu")
    x, y = next(loader)
    bos = tok.get_bos_token_id()
    row = ids0 + ids1 + [bos, bos]
    mask = mask0 + mask1 + [0, 0]
    expected_targets = [t if m else -1 for t, m in zip(row[1:], mask[1:])]
    assert x[0].tolist() == row[:-1] and y[0].tolist() == expected_targets
    assert x[1].tolist() == row[:-1]  # the buffer holds the dataset over and over: the same best fit again
    assert x.dtype == y.dtype == torch.long and x.shape == (2, T)
    # only what the assistant says is trained on: its tokens, nothing of the user's
    assert set(t for t in y[0].tolist() if t >= 0) <= set(ids0 + ids1)
    assert sum(mask[1:]) == int((y[0] >= 0).sum())


def test_long_conversations_are_truncated_not_stuck(small_tokenizer):
    """A conversation longer than a row is cut to the row and trained on (the reference would keep
    it in the buffer forever)."""
    tok = small_tokenizer
    ids0, mask0 = rendered(tok)[0]
    T = 10
    loader = SFTLoader(tok, DATA[:1], batch_size=3, seq_len=T, device="cpu")
    x, y = next(loader)
    assert x[0].tolist() == ids0[:T]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids0[1:T + 1], mask0[1:T + 1])]


def test_ranks_stride_and_epochs_count(small_tokenizer):
    loaders = [SFTLoader(small_tokenizer, DATA, 1, 64, "cpu", rank, 2) for rank in range(2)]
    for loader in loaders:
        loader.refill()
    assert [i for i, _, _ in loaders[0].buffer[:4]] == [0, 2, 1, 0]
    assert [i for i, _, _ in loaders[1].buffer[:4]] == [1, 0, 2, 1]
    # progress counts what went into rows, not what the buffer read ahead
    assert loaders[0].epoch > 1 and loaders[0].progress() == 0
    next(loaders[0])  # one 64-token row: the conversations that fit it
    assert loaders[0].progress() == loaders[0].packed * 2 / len(DATA) > 0


def test_exact_resume(small_tokenizer):
    loader = SFTLoader(small_tokenizer, DATA * 7, 2, 48, "cpu")
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    restored = SFTLoader(small_tokenizer, DATA * 7, 2, 48, "cpu")
    restored.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(restored) for _ in range(4)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stopping_at_progress_one_trains_every_conversation(small_tokenizer):
    """A loop holds one batch ahead; it stops once progress_before_latest reaches 1. Counted by
    hand in the rows (each conversation starts with BOS then <|user_start|>; padding is only
    BOS), the batches before the held one carry the whole dataset: none is left untrained."""
    tok = small_tokenizer
    bos, user_start = tok.get_bos_token_id(), tok.encode_special("<|user_start|>")
    data = DATA * 5  # 15 conversations, fewer than the buffer holds
    loader = SFTLoader(tok, data, batch_size=2, seq_len=40, device="cpu")
    trained, held = [], next(loader)
    while loader.progress_before_latest() < 1:
        trained.append(held)
        held = next(loader)
    starts = sum(int(((x[:, :-1] == bos) & (x[:, 1:] == user_start)).sum()) for x, _ in trained)
    last = int(((trained[-1][0][:, :-1] == bos) & (trained[-1][0][:, 1:] == user_start)).sum())
    assert len(data) <= starts < len(data) + last
