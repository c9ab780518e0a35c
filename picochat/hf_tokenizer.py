"""Our tokenizer in the Hugging Face format, and back.

    tokenizer.json            the `tokenizers` library's description of the tokenizer: a byte-level BPE
                              whose merges reproduce tiktoken's rank-based merging, our split regex,
                              the 9 special tokens, and <|bos|> prepended to a single sequence
    tokenizer_config.json     what transformers adds on top: the named special tokens, the maximum
                              length and the chat template (CHAT_TEMPLATE)
    special_tokens_map.json   the named special tokens again, for older readers

The JSON is written by hand, so exporting needs neither transformers nor tokenizers. One difference
in plain encoding remains: special-token text inside a string ("<|bos|>") is text to our encode, but
the special token to transformers unless it is called with split_special_tokens=True.
read_tokenizer_files rebuilds our tiktoken-based Tokenizer from tokenizer.json, with the same
fingerprint as the tokenizer that was written.
"""

import json
from pathlib import Path

import tiktoken

from picochat.common import PicochatError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
BOS, EOS = "<|bos|>", "<|assistant_end|>"


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE in `tokenizers`
    expects vocab strings in: bytes that are already printable (and not a space) stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_unicode(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# Our chat format (tokenizer.Tokenizer._render and _checked_messages) as a Jinja template, rendered to
# one string that the HF tokenizer cuts at the special tokens and BPE-encodes piece by piece. Our
# render encodes each content piece on its own, so the ids agree as long as every piece sits between
# two special tokens. Where they can differ:
#   - two consecutive text parts of an assistant message are one string here, so BPE may merge
#     across their boundary (our render encodes them separately);
#   - special-token text inside content ("<|user_end|>" typed by a user) is plain text to our encode
#     but a special token here; apply_chat_template(..., sanitize_control_tokens=True) keeps it text,
#     but encodes it apart from its neighbours, so the ids still differ where a space or punctuation
#     touches it (" <|" can be one token of ours);
#   - render_conversation truncates to max_tokens (2048 by default), the template never does.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is not string -%}"
    "{{- raise_exception(\"the system message's content must be a string\") -}}"
    "{%- endif -%}"
    "{%- if messages | length < 2 or messages[1]['role'] != 'user' or messages[1]['content'] is not string -%}"
    "{{- raise_exception('a system message must be followed by a user message with string content') -}}"
    "{%- endif -%}"
    "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_prefix = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- if not turns -%}"
    "{{- raise_exception('the conversation has no user or assistant messages') -}}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in turns -%}"
    "{%- set i = loop.index0 -%}"
    "{%- if message['role'] != ['user', 'assistant'][i % 2] -%}"
    "{{- raise_exception('message ' ~ i ~ ' has role ' ~ message['role'] ~ '; roles must alternate user, "
    "assistant, ... starting with user (after an optional leading system message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('user message ' ~ i ~ ' must have string content') -}}"
    "{%- endif -%}"
    "<|user_start|>{{ (system_prefix if loop.first else '') + message['content'] }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- elif message['content'] is sequence and message['content'] is not mapping -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is not mapping or part['text'] is not string -%}"
    "{{- raise_exception('assistant message ' ~ i ~ ' has a part that is not a dict with string text') -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- elif part['type'] == 'python' -%}"
    "<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}"
    "<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}"
    "{{- raise_exception('assistant message parts have type text, python or python_output') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{- raise_exception('assistant message ' ~ i ~ ' must have string content or a list of parts') -}}"
    "{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if turns[-1]['role'] != 'user' -%}"
    "{{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') -}}"
    "{%- endif -%}"
    "<|assistant_start|>"
    "{%- endif -%}"
)


# ---------------------------------------------------------------------------
# Layout and merges


def _layout_problem(ranks: dict[bytes, int], specials: dict[str, int]) -> str | None:
    """What keeps ranks + specials from being our layout (ids 0..255 the raw bytes, merges up to n-1,
    SPECIAL_TOKENS at n..n+8), or None."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        return f"the {n} byte/merge token ids are not 0..{n - 1}"
    if n < 256 or any(ranks.get(bytes([b])) != b for b in range(256)):
        return "ids 0..255 are not the 256 raw bytes in byte order"
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        return (f"the special tokens are {sorted(specials, key=specials.get)} at ids {sorted(specials.values())}, "
                f"not {SPECIAL_TOKENS} at ids {n}..{n + len(SPECIAL_TOKENS) - 1}")
    return None


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges under which `tokenizers` merges exactly as tiktoken does. tiktoken repeatedly
    joins the adjacent pair whose concatenation has the lowest rank, whichever two tokens it is made
    of, so every split of a token into two tokens is a merge, ranked by the whole token. That
    includes splits with a part newer than the whole: our trained vocabularies never joined such a
    pair in our checks, but random BPE vocabularies do, and a merge list without them then diverges
    from tiktoken. Two splits of one token share tiktoken's priority, where `tokenizers` needs an
    order; it would only matter if both were joinable at the same step, which neither kind of
    vocabulary ever produced in those checks, so they are simply ordered by their parts' ranks."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


# ---------------------------------------------------------------------------
# Writing


def _pre_tokenizer(pattern: str) -> dict:
    # Split cuts with our regex (Oniguruma runs it as tiktoken's fancy-regex does, possessive
    # quantifiers included); ByteLevel then only maps bytes to characters, without its own regex
    # or a prefix space
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


def _post_processor(bos_id: int) -> dict:
    """<|bos|> before a single sequence, as every document of pretraining started; before each of a
    pair, as two concatenated documents."""
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
    }


def _tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The content of tokenizer.json for one of our tokenizers."""
    ranks, specials = tokenizer.enc._mergeable_ranks, tokenizer.enc._special_tokens
    problem = _layout_problem(ranks, specials)
    if problem:
        raise PicochatError(f"only a tokenizer trained by picochat can be exported to the Hugging Face format: "
                            f"{problem}")
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(tokenizer.enc._pat_str),
        "post_processor": _post_processor(specials[BOS]),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # tiktoken takes a piece that is itself a token as that token before merging anything
            "ignore_merges": True,
            "vocab": {_to_unicode(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[_to_unicode(left), _to_unicode(right)] for left, right in _merges(ranks)],
        },
    }


def write_tokenizer_files(tokenizer: Tokenizer, out_dir, model_max_length: int):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise PicochatError(f"model_max_length must be a positive integer, not {model_max_length!r}")
    special_tokens_map = {
        "bos_token": BOS,
        "eos_token": EOS,  # a chat reply ends here (generation_config also stops at <|bos|>)
        # there is no pad token of its own; pad positions are masked out by the attention mask and
        # the labels, so any id serves, and BOS is one the model has seen everywhere
        "pad_token": BOS,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        # the other special tokens, so that all_special_ids covers them and skip_special_tokens drops them
        "extra_special_tokens": [name for name in SPECIAL_TOKENS if name not in (BOS, EOS)],
        "model_max_length": model_max_length,
        # a batch of prompts is padded on the left so that every prompt ends where generation starts
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    files = {TOKENIZER_FILE: _tokenizer_json(tokenizer), CONFIG_FILE: config,
             SPECIAL_TOKENS_MAP_FILE: special_tokens_map}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Reading


def _from_unicode(path: Path, text: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        raise PicochatError(f"{path} is not a picochat tokenizer: vocab entry {text!r:.40} has a character "
                            "outside the byte-level alphabet") from None


def _parse(path: Path, data) -> tuple[str, dict[bytes, int], dict[str, int]]:
    """(pattern, ranks, specials) of a tokenizer.json in our layout; raises PicochatError otherwise."""
    def foreign(what):
        return PicochatError(f"{path} is not a picochat tokenizer: {what}")

    model = data["model"]
    if model.get("type") != "BPE":
        raise foreign(f"its model is {model.get('type')!r}, not BPE")
    if not isinstance(model["vocab"], dict) or not all(isinstance(i, int) for i in model["vocab"].values()):
        raise foreign("model.vocab is not a mapping from tokens to integer ids")
    ranks = {_from_unicode(path, text): i for text, i in model["vocab"].items()}
    if len(ranks) != len(model["vocab"]):
        raise foreign("model.vocab has two entries for the same bytes")
    specials = {}
    for token in data["added_tokens"]:
        if not token.get("special"):
            raise foreign(f"added token {token.get('content')!r} is not special")
        specials[token["content"]] = token["id"]
    problem = _layout_problem(ranks, specials)
    if problem:
        raise foreign(problem)

    pre = data["pre_tokenizer"]
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2 and steps[0].get("type") == "Split"
            and isinstance(steps[0].get("pattern"), dict) and isinstance(steps[0]["pattern"].get("Regex"), str)):
        raise foreign("its pre_tokenizer is not a Sequence of a regex Split and ByteLevel")
    pattern = steps[0]["pattern"]["Regex"]
    if steps != _pre_tokenizer(pattern)["pretokenizers"]:
        raise foreign("its pre_tokenizer is not Split(regex, Isolated) then ByteLevel without prefix space or regex")
    if not model.get("ignore_merges"):
        raise foreign("model.ignore_merges is off, so a piece that is a token may still be split")
    expected_merges = [[_to_unicode(left), _to_unicode(right)] for left, right in _merges(ranks)]
    if [list(m) for m in model["merges"]] != expected_merges:
        raise foreign("model.merges are not the merges of its vocab in rank order, so it would not encode "
                      "as the rebuilt tokenizer does")
    return pattern, ranks, specials


def read_tokenizer_files(folder) -> Tokenizer:
    """Our Tokenizer from the tokenizer.json in folder (as write_tokenizer_files writes it)."""
    path = Path(folder) / TOKENIZER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PicochatError(f"{path} is missing: the folder has no tokenizer") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
    try:
        pattern, ranks, specials = _parse(path, data)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise PicochatError(f"{path} is not a picochat tokenizer (not the tokenizers JSON layout: "
                            f"{type(e).__name__}: {e})") from None
    try:
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:
        raise PicochatError(f"{path} has a split pattern tiktoken cannot compile ({e})") from None
    return Tokenizer(enc, BOS)
