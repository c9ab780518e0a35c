"""Inference: a KV cache, batched sampling and the python tool.

The model's forward takes a KVCache (gpt.GPT.forward(idx, cache=...)): a prompt is prefilled once
(in one piece or in chunks), then each decode step runs one token per row. Sliding windows, smear,
value embeddings, backout and softcap are the training forward's own code, so a cached decode
computes what a full recomputation of the sequence would, token for token (tests/test_engine.py).

Engine.generate prefills the prompt with batch 1, copies the cache into N rows, and samples the
rows independently from one seeded generator, streaming a token column at a time. generate_many
does the same for several prompts in one batch: shorter prompts are left-padded and the cache's
pad hides the padding from attention. Each row runs
the tool state machine: the tokens between <|python_start|> and <|python_end|> are an expression
for the calculator, which runs in the sandbox (sandbox.py); its result is forced back into the row
as <|output_start|> result <|output_end|>, with mask 0 (the model did not choose those tokens).
"""

from collections import deque
from dataclasses import dataclass, field

import torch

from picochat.checkpoint import SOURCES, load_model, pick_source, resolve_checkpoint
from picochat.common import PicochatError
from picochat.export import folder_step, load_folder
from picochat.sandbox import run_python


class KVCache:
    """Keys and values of every layer, (n_layer, B, n_kv_head, max_len, head_dim) in the compute
    dtype, for B rows that share one position; prev is the last token's normed embedding (smear).
    pad: None, or (B,) slots of left padding per row, which attention hides: prompts of several
    lengths then share one batch."""

    def __init__(self, model, batch_size: int, max_len: int, pad: torch.Tensor | None = None):
        c = model.config
        shape = (c.n_layer, batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head)
        device = model.get_device()
        self.k = torch.zeros(shape, dtype=model.compute_dtype, device=device)
        self.v = torch.zeros(shape, dtype=model.compute_dtype, device=device)
        self.pos = 0
        self.prev = None
        self.max_len = max_len
        self.pad = None if pad is None else pad.to(device)

    def copy_rows_from(self, other: "KVCache"):
        """Start each row of `other` over `repeats` consecutive rows here, where B = repeats x
        other's B (e.g. one prefilled prompt, N samples)."""
        n, rows = other.pos, other.k.size(1)
        repeats = self.k.size(1) // rows
        if repeats * rows != self.k.size(1) or n > self.max_len:
            raise ValueError("copy_rows_from takes a cache no longer than this one, whose rows divide these")
        self.k[:, :, :, :n] = other.k[:, :, :, :n].repeat_interleave(repeats, dim=1)
        self.v[:, :, :, :n] = other.v[:, :, :, :n].repeat_interleave(repeats, dim=1)
        self.pos = n
        self.prev = None if other.prev is None else other.prev.repeat_interleave(repeats, dim=0)
        self.pad = None if other.pad is None else other.pad.repeat_interleave(repeats)


def prefill(model, rows: list[list[int]], cache: KVCache, chunk: int | None = None):
    """Run prompts of equal length (left-pad shorter ones and give the cache their pad) through
    the cache, `chunk` tokens at a time (None: at once); the logits at their last position, (B, V)."""
    device = model.get_device()
    step = chunk or len(rows[0])
    for i in range(0, len(rows[0]), step):
        logits = model(torch.tensor([row[i:i + step] for row in rows], dtype=torch.long, device=device), cache=cache)
    return logits[:, -1]


def sample_next(logits, rng, temperature: float, top_k: int | None, top_p: float | None = None):
    """(B,) next tokens from (B, V) logits: argmax at temperature 0, else softmax(logits / T)
    over the top_k largest (all when top_k is None or 0), then over the smallest set of those
    whose probability reaches top_p (None or 1: all), drawn with the seeded generator."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    top_p = None if top_p is not None and top_p >= 1.0 else top_p  # 1 keeps all: the same draws as None
    if top_k:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    else:
        values, indices = torch.sort(logits, dim=-1, descending=True) if top_p is not None else (logits, None)
    probs = torch.softmax(values / temperature, dim=-1)
    if top_p is not None:
        # values are sorted (topk sorts): keep each token whose predecessors' mass is below top_p
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=rng)
    return choice.squeeze(1) if indices is None else indices.gather(1, choice).squeeze(1)


def top_logprobs(logits, tokens, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the log probability of its token under the model's distribution (temperature 1,
    no filtering) and the k likeliest tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1).tolist()
    best = torch.topk(logp, k, dim=-1) if k else None
    return [(c, [] if best is None else list(zip(best.indices[i].tolist(), best.values[i].tolist())))
            for i, c in enumerate(chosen)]


def calculator(expression: str) -> str | None:
    """The python tool: evaluate an arithmetic expression (or a string's .count()) in the sandbox,
    None when it is refused or fails. The same filter as the reference's, so what a model learned
    to call gives the same answers; the sandbox is what makes running it safe."""
    expression = expression.replace(",", "")
    if all(ch in "0123456789*+-/.() " for ch in expression):
        if "**" in expression:  # powers can take unbounded time and memory
            return None
    else:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
        banned = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                  "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
        if not set(expression) <= allowed or any(word in expression for word in banned) or ".count(" not in expression:
            return None
    code = f"print(eval({expression!r}, {{'__builtins__': {{}}}}, {{}}))"
    result = run_python(code, timeout=3.0)
    return result.stdout.rstrip("\n") if result.success else None


@dataclass
class RowState:
    """One sample's place in the tool protocol."""
    forced: deque = field(default_factory=deque)  # tokens to emit next instead of sampling
    in_python: bool = False
    python_tokens: list = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, prefill_chunk: int | None = None, tool=calculator):
        """prefill_chunk: prefill long prompts this many tokens at a time (None: in one piece).
        tool: str -> str | None, run on the text of each python block."""
        self.model, self.tokenizer, self.prefill_chunk, self.tool = model, tokenizer, prefill_chunk, tool
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def prefill(self, rows: list[list[int]], cache: KVCache):
        return prefill(self.model, rows, cache, self.prefill_chunk)

    def generate(self, tokens, num_samples: int = 1, **kwargs):
        """Yield (token column, mask column), lists of num_samples ints, one per generated position,
        until every row has stopped (<|assistant_end|> or <|bos|>) or max_tokens columns (None: up
        to the model's longest sequence). A row that stopped keeps producing tokens, which callers
        ignore; mask 0 marks tokens forced by the tool. Keywords: those of generate_many."""
        return self.generate_many([tokens], num_samples, **kwargs)

    @torch.inference_mode()
    def generate_many(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                      top_p: float | None = None, logprobs: int | None = None):
        """generate for several prompts at once: the columns hold num_samples rows per prompt,
        prompt by prompt. Prompts of other lengths are left-padded with BOS, which attention
        hides, so each row computes what it would alone (up to rounding); max_tokens is bounded
        by the longest prompt's room. With logprobs = k (0 or more), each column comes with a
        third list: per row (log probability of its token, the k likeliest (token, logprob))."""
        prompts = [list(p) for p in prompts]
        if not prompts or not all(prompts):
            raise PicochatError("generate needs at least one prompt token")
        longest = max(map(len, prompts))
        room = self.model.rotary_len - longest
        if room <= 0:
            raise PicochatError(f"prompt of {longest} tokens leaves no room to generate "
                                f"(the model takes at most {self.model.rotary_len})")
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        pads = [longest - len(p) for p in prompts]
        bos = self.tokenizer.get_bos_token_id()
        pad = torch.tensor(pads) if any(pads) else None  # unpadded rows keep the exact unmasked path
        prompt_cache = KVCache(self.model, len(prompts), longest, pad)
        logits = self.prefill([[bos] * n + p for n, p in zip(pads, prompts)], prompt_cache)
        logits = logits.repeat_interleave(num_samples, dim=0)
        cache = KVCache(self.model, len(prompts) * num_samples, longest + max_tokens)
        cache.copy_rows_from(prompt_cache)
        del prompt_cache
        rows = [RowState() for _ in range(len(prompts) * num_samples)]
        for step in range(max_tokens):
            sampled = sample_next(logits, rng, temperature, top_k, top_p).tolist()  # the one sync per column
            column, masks = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._advance(row, token)
            yield (column, masks) if logprobs is None else (column, masks, top_logprobs(logits, column, logprobs))
            if all(row.done for row in rows) or step == max_tokens - 1:
                return
            logits = self.model(torch.tensor(column, dtype=torch.long, device=device)[:, None], cache=cache)[:, -1]

    def _advance(self, row: RowState, token: int):
        """The tool state machine, after `token` was appended to the row."""
        if token in self.stop_tokens:
            row.done = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = self.tool(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens, num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """(sequences, masks): per sample the prompt and its generated tokens up to, not including,
        the token that stopped it; masks are 0 over the prompt and forced tokens, 1 elsewhere."""
        return self.complete([tokens], num_samples, **kwargs)[0]

    def complete(self, prompts: list[list[int]], num_samples: int = 1, **kwargs) -> list[tuple[list, list]]:
        """generate_batch for several prompts in one batch: a (sequences, masks) per prompt."""
        sequences = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(s) for s in sequences]
        done = [False] * len(sequences)
        for column, mask_column in self.generate_many(prompts, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    sequences[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        n = num_samples
        return [(sequences[i:i + n], masks[i:i + n]) for i in range(0, len(sequences), n)]


MODEL_SOURCES = (*SOURCES, "hf")  # the chat stages' -i: a checkpoint stage, or an exported folder (--path)


def resolve_model(source: str | None, model_tag: str | None, step: int | None, path: str | None):
    """(source, tag, step) of the model a chat stage was pointed at: a checkpoint (source None: the
    most trained stage; latest tag and last step unless given), or with -i hf the folder at path,
    known by its name and the step it was exported from."""
    if source == "hf":
        if path is None:
            raise PicochatError("-i hf needs --path, a folder written by `picochat export`")
        if model_tag is not None or step is not None:
            raise PicochatError("-g/--model-tag and -s/--step pick a checkpoint in $PICOCHAT_HOME; with -i hf, "
                                "--path is the model")
        tag, step = folder_step(path)
        return source, tag, step
    if path is not None:
        raise PicochatError("--path loads a folder written by `picochat export`: give it with -i hf")
    source = pick_source(source)
    ckpt_dir, step = resolve_checkpoint(source, model_tag, step)
    return source, ckpt_dir.name, step


def load_engine(source: str, device, dtype, model_tag: str | None = None, step: int | None = None,
                path: str | None = None, **engine_kwargs) -> tuple[Engine, dict]:
    """An Engine on a saved checkpoint (latest tag and step unless given), or on the exported folder
    at path when source is "hf", with its weights in the compute dtype, and the model's meta."""
    if source == "hf":
        model, tokenizer, meta = load_folder(path, device, dtype)
    else:
        model, tokenizer, meta = load_model(source, device, dtype, model_tag=model_tag, step=step)
    return Engine(model.cast_for_inference(), tokenizer, **engine_kwargs), meta
