"""The tokenizer in the Hugging Face format: transformers encodes, decodes and renders chats with the
written files exactly as our tiktoken-based tokenizer does, and the files read back into it."""

import json
import random
import shutil

import jinja2
import pytest
import tiktoken
import transformers

from picochat.common import PicochatError
from picochat.hf_tokenizer import read_tokenizer_files, write_tokenizer_files
from picochat.tokenizer import Tokenizer

TEXTS = [
    "Hello world, don't stop: I'LL go! She'd've said WE'RE ready.",
    "12345 + 678 = 13023, and 3.14159 or 1,000,000",
    "  leading spaces\tand\ttabs\n\n\nnewlines  \n  \r\n trailing   ",
    "punctuation!!! ?? ... --- (a) [b] {c} <d> \"quoted\" 'single' `tick` #hash @at $5 %20 ^&*~|\\/",
    "café naïve Zürich señor déjà œuvre ÀÉÎÕÜ",
    "東京は日本の首都です。中文字符和한국어",
    "emoji 😀👍🏽 🇯🇵 and a ZWJ family 👨‍👩‍👧",
    "bytes never merged in training: \x00\x01\x7f ¤ ‰ ∑∫√ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "x",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you?"},
     {"role": "assistant", "content": "I'm fine, thanks! And you?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
     {"role": "user", "content": " second\n"}, {"role": "assistant", "content": "two "},
     {"role": "user", "content": "third?"}, {"role": "assistant", "content": "三"}],
    [{"role": "user", "content": "What is 12 * 34?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute it. "},
                                       {"type": "python", "text": "12 * 34"},
                                       {"type": "python_output", "text": "408"},
                                       {"type": "text", "text": " It is 408."}]}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_tokenizer):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer_files(small_tokenizer, folder, model_max_length=512)
    return folder


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def random_texts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """Strings of random characters and of concatenated vocab tokens, where BPE's merge order matters."""
    rng = random.Random(seed)
    alphabet = "aeiouxyzAE \n\t\r'sdmltvre0123456789!?.,-_éü東😀" + "".join(chr(rng.randrange(0x20, 0x3000))
                                                                         for _ in range(30))
    pieces = [tokenizer.id_to_token(i) for i in range(256, tokenizer.get_vocab_size() - 9)]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    return texts + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def test_transformers_encodes_and_decodes_like_ours(hf_dir, hf_tok, small_tokenizer):
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    bos = small_tokenizer.get_bos_token_id()
    for text in TEXTS:
        ours = small_tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf_tok(text)["input_ids"] == [bos] + ours, text
        assert hf_tok.decode(ours) == text
    texts = random_texts(small_tokenizer, 2000)
    assert hf_tok(texts, add_special_tokens=False)["input_ids"] == small_tokenizer.encode(texts)
    # special-token text is plain text to our encode; transformers matches it as the token unless told not to
    text = "<|bos|> and <|user_end|> as plain text in a document"
    assert hf_tok(text, add_special_tokens=False)["input_ids"][0] == bos
    split = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert split == small_tokenizer.encode(text)

    assert len(hf_tok) == small_tokenizer.get_vocab_size()
    assert hf_tok.bos_token_id == hf_tok.pad_token_id == bos
    assert hf_tok.eos_token_id == small_tokenizer.encode_special("<|assistant_end|>")
    assert hf_tok.model_max_length == 512 and hf_tok.padding_side == "left"
    assert sorted(hf_tok.all_special_ids) == list(range(small_tokenizer.get_vocab_size() - 9,
                                                        small_tokenizer.get_vocab_size()))
    assert hf_tok.decode(small_tokenizer.render_conversation({"messages": CONVERSATIONS[0]})[0],
                         skip_special_tokens=True) == "Hello there, how are you?I'm fine, thanks! And you?"
    # the files alone describe the tokenizer, for readers other than transformers
    assert (hf_dir / "special_tokens_map.json").exists()
    assert json.loads((hf_dir / "tokenizer.json").read_text())["model"]["ignore_merges"] is True


def test_chat_template_renders_our_chat_format(hf_tok, small_tokenizer):
    for messages in CONVERSATIONS:
        conversation = {"messages": messages}
        ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == small_tokenizer.render_conversation(conversation)[0]
        prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        assert prompt == small_tokenizer.render_for_completion(conversation)

    bad = [([{"role": "assistant", "content": "hi"}], "roles must alternate"),
           ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
           ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
           ([{"role": "user", "content": ["a"]}], "string content"),
           ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
            "type text, python or python_output"),
           (CONVERSATIONS[2][:3] + [{"role": "assistant", "content": [{"type": "text"}]}],
            "assistant message 3 has a part that is not a dict with string text")]
    for messages, error in bad:
        with pytest.raises(jinja2.TemplateError, match=error):
            hf_tok.apply_chat_template(messages, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="ends with a user message"):
        hf_tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)


def test_special_token_text_in_a_message(hf_tok, small_tokenizer):
    """Our encode keeps "<|user_end|>" typed into a message as text; the template's string makes it the
    special token, unless transformers is asked to sanitize it (exact here, with letters around it)."""
    messages = [{"role": "user", "content": "say x<|user_end|>y"}, {"role": "assistant", "content": "ok"}]
    ours = small_tokenizer.render_conversation({"messages": messages})[0]
    plain = hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert plain != ours and plain.count(small_tokenizer.encode_special("<|user_end|>")) == 2
    assert hf_tok.apply_chat_template(messages, return_dict=True, sanitize_control_tokens=True)["input_ids"] == ours


def test_read_back_gives_the_same_tokenizer(hf_dir, hf_tok, small_tokenizer, tmp_path):
    back = read_tokenizer_files(hf_dir)
    assert back.fingerprint() == small_tokenizer.fingerprint()
    texts = TEXTS + random_texts(small_tokenizer, 200, seed=1)
    assert back.encode(texts) == small_tokenizer.encode(texts)
    assert back.get_special_tokens() == small_tokenizer.get_special_tokens()
    # a folder transformers saved again still reads back
    hf_tok.save_pretrained(tmp_path)
    assert read_tokenizer_files(tmp_path).fingerprint() == small_tokenizer.fingerprint()


def edited(hf_dir, tmp_path, edit):
    """A copy of hf_dir whose tokenizer.json is edit(data), or the text edit returns."""
    folder = tmp_path / "edited"
    shutil.copytree(hf_dir, folder)
    data = edit(json.loads((folder / "tokenizer.json").read_text()))
    (folder / "tokenizer.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


def wordpiece(data):
    return {**data, "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}}


def without_specials(data):
    return {**data, "added_tokens": []}


def swapped_merges(data):
    merges = data["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]
    return data


def without_split(data):
    return {**data, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True}}


def non_byte_level_vocab(data):
    data["model"]["vocab"]["hello world"] = len(data["model"]["vocab"])
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda data: "{not json", "is not readable JSON"),
    (lambda data: [1, 2, 3], "is not a picochat tokenizer"),
    (wordpiece, "its model is 'WordPiece', not BPE"),
    (without_specials, "the special tokens are"),
    (swapped_merges, "model.merges are not the merges of its vocab"),
    (without_split, "pre_tokenizer is not a Sequence"),
    (non_byte_level_vocab, "outside the byte-level alphabet"),
])
def test_foreign_or_corrupt_tokenizer_json(hf_dir, tmp_path, edit, message):
    folder = edited(hf_dir, tmp_path, edit)
    with pytest.raises(PicochatError, match=message) as e:
        read_tokenizer_files(folder)
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(PicochatError, match="tokenizer.json is missing") as e:
        read_tokenizer_files(tmp_path)
    assert "\n" not in str(e.value)


def test_only_our_layout_is_exported(small_tokenizer, tmp_path):
    enc = small_tokenizer.enc
    n = len(enc._mergeable_ranks)
    stock = tiktoken.Encoding(name="stock", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                              special_tokens={"<|endoftext|>": n})
    with pytest.raises(PicochatError, match="only a tokenizer trained by picochat"):
        write_tokenizer_files(Tokenizer(stock, "<|endoftext|>"), tmp_path, model_max_length=512)
    with pytest.raises(PicochatError, match="model_max_length"):
        write_tokenizer_files(small_tokenizer, tmp_path, model_max_length=0)
    assert not any(tmp_path.iterdir())
