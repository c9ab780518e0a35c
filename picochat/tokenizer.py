"""Byte-level BPE tokenizer: trained with rustbpe, served with tiktoken, plus the
chat format (special tokens and the loss mask of a rendered conversation).

Tokens 0..255 are the raw bytes (no GPT-2 byte-to-unicode remapping), 256.. are
merges in the order they were learned, and the 9 special tokens sit at the top.
"""

import copy
import hashlib
import os
import pickle
from pathlib import Path

import rustbpe
import tiktoken
import torch

from picochat.common import PicochatError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the pretraining loader aligns rows to it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output comes back
    "<|output_end|>",
]

# GPT-4's split pattern, except that numbers are chunked in runs of 1-2 digits (not 1-3):
# at 32K vocab this measured slightly better bits per byte.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class ConversationError(PicochatError, ValueError):
    """A conversation that does not follow the chat format."""


class Tokenizer:
    """A tiktoken Encoding plus the name of its BOS token."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    # -- construction --------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int) -> "Tokenizer":
        """Learn vocab_size - 9 byte/merge tokens from an iterable of strings and add the specials on top."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise PicochatError(f"vocab size {vocab_size} is too small: it needs at least 256 byte tokens "
                                f"+ {len(SPECIAL_TOKENS)} special tokens = {MIN_VOCAB_SIZE}")
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
        ranks_list = bpe.get_mergeable_ranks()
        if len(ranks_list) < num_ranks:
            # rustbpe stops early once no pair occurs twice in the text any more
            raise PicochatError(f"the training text only supports {len(ranks_list) - 256} merges, but vocab size "
                                f"{vocab_size} needs {num_ranks - 256}: train on more text or a smaller vocab")
        mergeable_ranks = {bytes(token): rank for token, rank in ranks_list}
        if sorted(mergeable_ranks.values()) != list(range(num_ranks)):
            raise RuntimeError("rustbpe returned ranks that are not 0..n-1 with distinct token bytes")
        special_tokens = {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, directory) -> "Tokenizer":
        path = Path(directory) / "tokenizer.pkl"
        if not path.exists():
            raise PicochatError(f"no tokenizer at {path}: run `picochat tok-train` first")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise PicochatError(f"{path} is not a readable tokenizer ({type(e).__name__}: {e}); "
                                "rerun `picochat tok-train`") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise PicochatError(f"{path} holds a {type(enc).__name__}, not a tiktoken Encoding")
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, name: str) -> "Tokenizer":
        """A stock tiktoken encoding ("gpt2", "cl100k_base"); its <|endoftext|> serves as BOS."""
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # offline, unknown name, broken cache: tiktoken raises many kinds
            raise PicochatError(f"tiktoken encoding {name!r} is unavailable ({type(e).__name__})") from None
        return cls(enc, "<|endoftext|>")

    def save(self, directory):
        """Write tokenizer.pkl (a pickled tiktoken Encoding) and token_bytes.pt, each via a temp file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "tokenizer.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.enc, f)
        os.replace(tmp, directory / "tokenizer.pkl")
        tmp = directory / "token_bytes.pt.tmp"
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, directory / "token_bytes.pt")

    def fingerprint(self) -> str:
        """sha256 of what decides every id: the split pattern, the merges with their ranks and the
        special tokens. Two tokenizers with the same vocab size but other merges differ here."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        for name, rank in sorted(self.enc._special_tokens.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + name.encode() + b"\0")
        return h.hexdigest()

    # -- vocabulary ----------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        """Names of the special tokens, in id order."""
        return sorted(self._special_ids, key=self._special_ids.get)

    def encode_special(self, name: str) -> int:
        if name not in self._special_ids:
            raise PicochatError(f"{name!r} is not a special token of this tokenizer")
        return self._special_ids[name]

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab,): how many raw bytes each token stands for; 0 for special tokens (and for
        unused ids, which some stock encodings have). Counted on the bytes themselves: tokens that
        are not valid UTF-8 on their own must not be counted as U+FFFD's 3 bytes."""
        special = set(self._special_ids.values())
        lengths = []
        for i in range(self.get_vocab_size()):
            if i in special:
                lengths.append(0)
                continue
            try:
                lengths.append(len(self.enc.decode_single_token_bytes(i)))
            except KeyError:
                lengths.append(0)
        return torch.tensor(lengths, dtype=torch.int32)

    # -- encode / decode -----------------------------------------------------

    def _token_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Ids of a string, or a list of id lists for a list of strings. Special-token strings inside
        the text are plain text here. prepend/append: a token id or a special token's name."""
        before = [] if prepend is None else [self._token_id(prepend)]
        after = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return before + self.enc.encode_ordinary(text) + after
        if isinstance(text, (list, tuple)):
            batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [before + ids + after for ids in batch]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    # -- chat format ---------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """(ids, mask) of a conversation, truncated to max_tokens. mask[i] = 1 where the model is trained
        to predict ids[i]: the assistant's text, its python calls (with their delimiters) and
        <|assistant_end|>. BOS, user turns, <|assistant_start|> and tool outputs get 0."""
        ids, mask = self._render(_checked_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation, max_tokens: int = 2048) -> list[int]:
        """The prompt for sampling the final assistant reply: the conversation without that reply,
        truncated to max_tokens like render_conversation, then <|assistant_start|> (as the reference
        does, so the same conversation gives the same prompt)."""
        messages = _checked_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ConversationError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self._render(messages[:-1])
        return ids[:max_tokens] + [self.encode_special("<|assistant_start|>")]

    def _render(self, messages):
        ids, mask = [], []

        def add(tokens, supervised):
            tokens = [self.encode_special(tokens)] if isinstance(tokens, str) else tokens
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        add("<|bos|>", 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add("<|user_start|>", 0)
                add(self.encode(content), 0)
                add("<|user_end|>", 0)
                continue
            add("<|assistant_start|>", 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add("<|python_start|>", 1)
                    add(self.encode(part["text"]), 1)
                    add("<|python_end|>", 1)
                else:  # python_output: produced by the tool, so never a prediction target
                    add("<|output_start|>", 0)
                    add(self.encode(part["text"]), 0)
                    add("<|output_end|>", 0)
            add("<|assistant_end|>", 1)
        return ids, mask


PART_TYPES = ("text", "python", "python_output")


def _checked_messages(conversation) -> list[dict]:
    """The conversation's messages with a leading system message merged into the first user message
    (on a copy), after checking the format; raises ConversationError saying what is wrong."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ConversationError("a conversation is a dict with a 'messages' list")
    messages = copy.deepcopy(conversation["messages"])
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {i} is not a dict with 'role' and 'content'")
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        if not isinstance(system, str):
            raise ConversationError("the system message's content must be a string")
        if not messages or messages[0]["role"] != "user" or not isinstance(messages[0]["content"], str):
            raise ConversationError("a system message must be followed by a user message with string content")
        messages[0]["content"] = system + "\n\n" + messages[0]["content"]
    if not messages:
        raise ConversationError("the conversation has no user or assistant messages")
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"message {i} has role {role!r}; roles must alternate user, assistant, ... "
                                    "starting with user (after an optional leading system message)")
        if role == "user":
            if not isinstance(content, str):
                raise ConversationError(f"user message {i} must have string content")
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    raise ConversationError(f"assistant message {i} has a part that is not a dict with type in "
                                            f"{PART_TYPES}: {part!r:.80}")
                if not isinstance(part.get("text"), str):
                    raise ConversationError(f"assistant message {i} has a {part['type']} part without string text")
        elif not isinstance(content, str):
            raise ConversationError(f"assistant message {i} must have string content or a list of parts")
    return messages


# ---------------------------------------------------------------------------
# The trained tokenizer under $PICOCHAT_HOME


def get_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu") -> torch.Tensor:
    path = get_tokenizer_dir() / "token_bytes.pt"
    if not path.exists():
        raise PicochatError(f"no token byte counts at {path}: run `picochat tok-train` first")
    return torch.load(path, map_location=device)
