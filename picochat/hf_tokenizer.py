"""Our tokenizer in the Hugging Face format, and back.

Why a PreTrainedTokenizerFast (tokenizer.json) and not custom tokenizer code: every Hugging Face
tool (AutoTokenizer, pipelines, TGI, vLLM, the Hub's widgets) reads tokenizer.json with no
trust_remote_code and no tiktoken, in Rust. Our BPE maps onto it exactly:
- tiktoken ranks are a BPE vocabulary; its tokens are raw bytes, which tokenizer.json spells in
  GPT-2's byte-to-unicode alphabet (the ByteLevel pre-tokenizer and decoder undo it)
- tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; a BPE
  whose merges list every split of every token into two tokens, ordered by the merged token's
  rank, does the same (ignore_merges: a piece that is a token is taken whole, as tiktoken does)
- the split regex runs in a Split pre-tokenizer (Oniguruma reads its possessive quantifiers)
- a post-processor prepends <|bos|>, so tokenizer("text") gives what the base model saw

The files are plain JSON written here: exporting needs neither transformers nor tokenizers.
"""

import json
from pathlib import Path

import tiktoken

from picochat.common import PicochatError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# apply_chat_template renders our chat format (tokenizer.py's render_conversation) as a string whose
# special tokens the fast tokenizer maps to their ids and whose pieces between them it encodes one by
# one, as render_conversation does. Two cases differ from it: consecutive text parts of an assistant
# message are encoded together here (separately there), and special-token text inside a message
# becomes that special token here (plain text there).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set i = loop.index0 - (1 if messages[0]['role'] == 'system' else 0) -%}"
    "{%- if (message['role'] == 'user') != (i % 2 == 0) or message['role'] not in ('user', 'assistant') -%}"
    "{{- raise_exception('roles must alternate user, assistant, ... starting with user "
    "(after an optional leading system message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- else -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def spell(token: bytes, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in token)


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) pair of tokens whose concatenation is a token, ordered by that token's
    rank (then by the pieces' ranks, which only orders splits of the same token)."""
    pairs = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                pairs.append((rank, ranks[left], ranks[right], left, right))
    pairs.sort()
    return [(left, right) for *_, left, right in pairs]


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    enc = tokenizer.enc
    alphabet = byte_alphabet()
    ranks = enc._mergeable_ranks
    bos = tokenizer.get_bos_token_id()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|bos|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [bos], "tokens": ["<|bos|>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {spell(token, alphabet): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[spell(a, alphabet), spell(b, alphabet)] for a, b in merges(ranks)],
        },
    }


def write_tokenizer_files(tokenizer: Tokenizer, out_dir, model_max_length: int):
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    if tokenizer.get_special_tokens() != SPECIAL_TOKENS:
        raise PicochatError("only a tokenizer trained by `picochat tok-train` can be exported (its 9 special tokens)")
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False))
    # pad with <|bos|>: padded positions are masked, so any token would do, and this one exists
    special = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def read_tokenizer_files(folder) -> Tokenizer:
    """Our Tokenizer from a tokenizer.json that write_tokenizer_files wrote (the same ids, the
    same fingerprint), or a one-line error saying why the file is not one."""
    path = Path(folder) / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PicochatError(f"{path} is missing: the folder has no tokenizer") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    try:
        model, split = data["model"], data["pre_tokenizer"]["pretokenizers"][0]
        if model["type"] != "BPE" or split["type"] != "Split":
            raise ValueError(f"a {model['type']} model after a {split['type']} pre-tokenizer")
        pattern = split["pattern"]["Regex"]
        inverse = {c: b for b, c in byte_alphabet().items()}
        ranks = {bytes(inverse[c] for c in token): rank for token, rank in model["vocab"].items()}
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("the vocabulary's ids are not 0..n-1")
        specials = {t["content"]: t["id"] for t in data["added_tokens"] if t.get("special")}
        if specials != {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}:
            raise ValueError("its special tokens are not picochat's 9, right after the vocabulary")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        detail = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        raise PicochatError(f"{path} is not a picochat tokenizer ({detail})") from None
    enc = tiktoken.Encoding(name="picochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, "<|bos|>")
