"""The BPE tokenizer and the chat format, on tokenizers trained on generated text."""

import collections
import pickle

import pytest
import regex
import tiktoken
import torch
from synthetic import TextGenerator

from picochat.common import PicochatError
from picochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    ConversationError,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
    get_tokenizer_dir,
)

MIXED_TEXTS = [
    "Hello, world! It's 2024; we've got 1,234,567 reasons.",
    "Café, naïve, résumé, Ångström, Dvořák, Łódź",
    "中文：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Emoji 🚀🌍 👍🏽 and a family 👨‍👩‍👧 (ZWJ sequence)",
    "unseenwordzyxq qwertzuiopasdf",
    "  leading spaces\ttabs\r\nwindows newlines\n\n\ntrailing   ",
    "x = {'a': [1, 2.5e-3]} if y >= 0 else None  # code",
    "",
]


def generated_text(chars=300_000) -> str:
    """English-like paragraphs (see synthetic.TextGenerator), with numbers and accented words."""
    return TextGenerator(seed=5).document(chars)[:chars]


@pytest.fixture(scope="module")
def tok():
    """A 256 + 300 + 9 vocab trained on generated text, split into paragraphs."""
    return Tokenizer.train_from_iterator(generated_text().split("\n\n"), vocab_size=256 + 300 + 9)


def slow_bpe_vocab(text: str, num_merges: int) -> list[bytes]:
    """Textbook byte-level BPE: split with the pattern, repeatedly merge the most frequent adjacent pair
    (ties: the smallest pair), and return the bytes of every token in id order."""
    chunks = collections.Counter(regex.findall(SPLIT_PATTERN, text))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunks.items()]
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(num_merges):
        pairs = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i:i + 2] = [new_id]
                i += 1
    return vocab


# ---------------------------------------------------------------------------
# Training and vocabulary


def test_merges_match_textbook_bpe():
    text = generated_text(20_000) + " 1234567 3.14159 你好，世界 🚀🚀"
    expected = slow_bpe_vocab(text, 100)
    t = Tokenizer.train_from_iterator([text], vocab_size=256 + 100 + 9)
    assert [t.decode_single_token_bytes(i) for i in range(256 + 100)] == expected


def test_exact_vocab_and_special_tokens_on_top(tok):
    assert tok.get_vocab_size() == 565
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(556, 565))
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert tok.get_bos_token_id() == 556
    assert tok.id_to_token(ord("A")) == "A"


def test_numbers_split_into_at_most_two_digits():
    # with GPT-4's 1-3 digit chunks "123" would be the second merge; 1-2 digit chunks keep it out
    t = Tokenizer.train_from_iterator(["abc 123123123 1234 " * 200], vocab_size=256 + 9 + 5)
    digit_tokens = [t.decode_single_token_bytes(i) for i in range(256, 261)]
    digit_tokens = [b for b in digit_tokens if b.strip().isdigit()]
    assert digit_tokens and all(len(b.strip()) <= 2 for b in digit_tokens)
    assert all(len(t.decode_single_token_bytes(i)) <= 2 for i in t.encode("123123123"))


def test_vocab_too_small_errors():
    with pytest.raises(PicochatError, match="too small"):
        Tokenizer.train_from_iterator(["hello world"], vocab_size=264)


def test_too_little_text_for_the_vocab_errors():
    with pytest.raises(PicochatError, match="merges"):
        Tokenizer.train_from_iterator(["hello world hello there"], vocab_size=256 + 9 + 100)


# ---------------------------------------------------------------------------
# Encoding and decoding


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip(small_tokenizer, tok, text):
    for t in (small_tokenizer, tok):
        assert t.decode(t.encode(text)) == text


def test_token_bytes_count_raw_bytes(small_tokenizer):
    token_bytes = small_tokenizer.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (1024,)
    assert token_bytes[:256].tolist() == [1] * 256  # bytes >= 0x80 decode to U+FFFD as str; still 1 byte each
    assert token_bytes[1024 - 9:].tolist() == [0] * 9
    for text in MIXED_TEXTS:
        ids = small_tokenizer.encode(text)
        raw = b"".join(small_tokenizer.decode_single_token_bytes(i) for i in ids)
        assert raw == text.encode("utf-8")
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_decoding_partial_utf8(small_tokenizer):
    raw = "你好🚀".encode()
    byte_ids = list(raw)  # byte tokens: id i is byte i
    assert small_tokenizer.decode(byte_ids) == "你好🚀"
    assert small_tokenizer.decode_single_token_bytes(0xE4) == b"\xe4"
    assert small_tokenizer.decode(byte_ids[:2]) == "\ufffd"  # a cut-off character decodes to U+FFFD, no error
    assert small_tokenizer.decode([0xFF, ord("a")]) == "\ufffda"
    assert small_tokenizer.id_to_token(0x80) == "\ufffd"


def test_special_strings_in_text_are_ordinary(small_tokenizer):
    specials = set(range(1024 - 9, 1024))
    for name in SPECIAL_TOKENS:
        ids = small_tokenizer.encode(f"say {name} now")
        assert len(small_tokenizer.encode(name)) > 1
        assert not specials & set(ids)
        assert small_tokenizer.decode(ids) == f"say {name} now"


def test_prepend_and_append(small_tokenizer):
    bos, end = small_tokenizer.encode_special("<|bos|>"), small_tokenizer.encode_special("<|user_end|>")
    body = small_tokenizer.encode("Hello there")
    assert small_tokenizer.encode("Hello there", prepend="<|bos|>", append=end) == [bos] + body + [end]
    assert small_tokenizer.encode(["Hello there", ""], prepend=bos) == [[bos] + body, [bos]]
    with pytest.raises(PicochatError):
        small_tokenizer.encode("x", prepend="<|no_such_token|>")
    with pytest.raises(TypeError):
        small_tokenizer.encode(b"bytes")


def test_batch_equals_single(small_tokenizer):
    texts = MIXED_TEXTS * 3
    expected = [small_tokenizer.encode(t) for t in texts]
    assert small_tokenizer.encode(texts) == expected
    assert small_tokenizer.encode(texts, num_threads=1) == expected


# ---------------------------------------------------------------------------
# Saving and loading


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path)
    with open(tmp_path / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.name == "rustbpe" and enc._pat_str == SPLIT_PATTERN
    assert enc.encode("<|bos|>", allowed_special="all") == [556]
    loaded = Tokenizer.from_directory(tmp_path)
    text = " ".join(MIXED_TEXTS)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.get_special_tokens() == SPECIAL_TOKENS and loaded.get_bos_token_id() == 556
    token_bytes = torch.load(tmp_path / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and torch.equal(token_bytes, tok.token_bytes())
    assert not list(tmp_path.glob("*.tmp"))


def test_get_tokenizer_from_home(tok, picochat_home):
    for load in (get_tokenizer, lambda: get_token_bytes("cpu")):
        with pytest.raises(PicochatError, match="picochat tok-train"):
            load()
    tok.save(get_tokenizer_dir())
    assert get_tokenizer_dir() == picochat_home / "tokenizer"
    assert get_tokenizer().encode("To be, or not") == tok.encode("To be, or not")
    assert torch.equal(get_token_bytes("cpu"), tok.token_bytes())


def test_corrupt_pickle_errors(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(PicochatError, match="tok-train"):
        Tokenizer.from_directory(tmp_path)


def test_unknown_pretrained_encoding_errors():
    with pytest.raises(PicochatError, match="unavailable"):
        Tokenizer.from_pretrained("no_such_encoding")


# ---------------------------------------------------------------------------
# Chat format

TOOL_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*34?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute that. "},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "It is 408."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_tool_render(t):
    """The rendering of TOOL_CONVERSATION, written out segment by segment."""
    S = t.encode_special
    segments = [
        ([S("<|bos|>")], 0),
        ([S("<|user_start|>")], 0), (t.encode("Be brief.\n\nWhat is 12*34?"), 0), ([S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0),
        (t.encode("Let me compute that. "), 1),
        ([S("<|python_start|>")], 1), (t.encode("12*34"), 1), ([S("<|python_end|>")], 1),
        ([S("<|output_start|>")], 0), (t.encode("408"), 0), ([S("<|output_end|>")], 0),
        (t.encode("It is 408."), 1),
        ([S("<|assistant_end|>")], 1),
        ([S("<|user_start|>")], 0), (t.encode("Thanks!"), 0), ([S("<|user_end|>")], 0),
        ([S("<|assistant_start|>")], 0), (t.encode("You're welcome."), 1), ([S("<|assistant_end|>")], 1),
    ]
    ids = [i for seg, _ in segments for i in seg]
    mask = [m for seg, m in segments for _ in seg]
    return ids, mask


def test_render_tool_conversation(small_tokenizer):
    ids, mask = small_tokenizer.render_conversation(TOOL_CONVERSATION)
    assert (ids, mask) == expected_tool_render(small_tokenizer)
    assert TOOL_CONVERSATION["messages"][1]["content"] == "What is 12*34?"  # the merge worked on a copy


def test_system_message_merge(small_tokenizer):
    with_system = {"messages": [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    merged = {"messages": [{"role": "user", "content": "You are terse.\n\nHi"},
                           {"role": "assistant", "content": "Hello."}]}
    assert small_tokenizer.render_conversation(with_system) == small_tokenizer.render_conversation(merged)


def test_truncation(small_tokenizer):
    full_ids, full_mask = expected_tool_render(small_tokenizer)
    ids, mask = small_tokenizer.render_conversation(TOOL_CONVERSATION, max_tokens=10)
    assert ids == full_ids[:10] and mask == full_mask[:10]


def test_render_for_completion(small_tokenizer):
    S = small_tokenizer.encode_special
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    expected = ([S("<|bos|>"), S("<|user_start|>")] + small_tokenizer.encode("2+2?")
                + [S("<|user_end|>"), S("<|assistant_start|>")])
    assert small_tokenizer.render_for_completion(conv) == expected
    full_ids, _ = expected_tool_render(small_tokenizer)
    prompt = small_tokenizer.render_for_completion(TOOL_CONVERSATION)
    last_answer = len(small_tokenizer.encode("You're welcome.")) + 1  # + assistant_end
    assert prompt == full_ids[:-last_answer]
    with pytest.raises(ConversationError, match="ends with an assistant"):
        small_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_render_for_completion_truncates_before_the_assistant_start(small_tokenizer):
    """As in the reference: the conversation is cut to 2,048 tokens, then <|assistant_start|> follows."""
    long = {"messages": [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}]}
    full, _ = small_tokenizer.render_conversation({"messages": long["messages"][:1] + [ASSISTANT]}, max_tokens=10**6)
    prompt = small_tokenizer.render_for_completion(long)
    assert len(full) > 2049 and len(prompt) == 2049
    assert prompt == full[:2048] + [small_tokenizer.encode_special("<|assistant_start|>")]


USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("conversation", [
    [USER, ASSISTANT],  # not a dict
    {"messages": []},
    {"messages": [{"role": "system", "content": "sys"}]},
    {"messages": [ASSISTANT]},
    {"messages": [USER, USER]},
    {"messages": [USER, ASSISTANT, ASSISTANT]},
    {"messages": [USER, {"role": "system", "content": "late system"}]},
    {"messages": [{"role": "user", "content": ["list", "content"]}]},
    {"messages": [{"role": "user"}]},
    {"messages": [USER, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
    {"messages": [USER, {"role": "assistant", "content": [{"type": "text"}]}]},
    {"messages": [USER, {"role": "assistant", "content": 42}]},
    {"messages": [{"role": "system", "content": "sys"}, ASSISTANT]},
])
def test_invalid_conversations(small_tokenizer, conversation):
    with pytest.raises(ConversationError) as info:
        small_tokenizer.render_conversation(conversation)
    assert isinstance(info.value, PicochatError) and isinstance(info.value, ValueError)
