"""Serving for `picochat chat-web`: request checking, the worker pool, and one request's generation
turned into text deltas. No web framework here: stages/chat_web.py maps HTTP onto these.

A request is checked whole before it waits for a worker (ApiError carries the HTTP status and
OpenAI's error shape). A worker is one model + Engine; the pool hands workers out first come,
first served, and answers 503 when all are busy and `max_queue` requests already wait. The engine
runs in a thread (it is synchronous) and passes each token column to the event loop; the request
side turns columns into text. A request that is abandoned (client gone) sets a flag the thread
checks at every token, so its worker comes back after at most one more decode step.

Text is cut into deltas by the reference's UTF-8 rule: decode everything so far and send only the
new suffix, and only when it does not end in U+FFFD (half a character). Stop strings are found in
the decoded text; a tail that could still become one is held back until it cannot.
"""

import asyncio
import collections
import json
import math
import random
import re
import threading
from dataclasses import dataclass, field

import torch

from picochat.tokenizer import ConversationError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    """The reference's abuse limits, plus the body size and the OpenAI extras' ranges."""
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_top_k: int = 200
    max_n: int = 8
    max_top_logprobs: int = 20
    max_stops: int = 4
    max_stop_chars: int = 256


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 503: "server_error",
                             500: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list  # {role, content: str}, as the chat format renders them
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float | None = None
    stop: list = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: not asked for; k: with the k likeliest alternatives
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(raw):,} bytes is over the limit of {limits.max_body_bytes:,}",
                       code="request_too_large")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8", code="invalid_encoding") from None
    except (ValueError, RecursionError) as e:  # nesting deep enough to exhaust the parser is not JSON we take
        raise ApiError(400, f"request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def number(body: dict, name: str, default, lo, hi, integer: bool = False, lo_open: bool = False):
    """body[name] (default when absent or null), checked: a wrong type is 400, out of range 422."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name,
                       code="invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"{'above' if lo_open else 'at least'} {lo}"
        raise ApiError(422, f"'{name}' must be {bound} and at most {hi} (got {value})", param=name,
                       code="out_of_range")
    return value


def content_text(content, i: int):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages",
                   code="invalid_type")


TOOL_BLOCK = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


def assistant_parts(text: str):
    """An answer as the server sent it, tool calls and outputs between their delimiters, back
    into the chat format's parts, so the model reads its history as it wrote it; plain text
    stays a string."""
    parts, at = [], 0
    for match in TOOL_BLOCK.finditer(text):
        if match.start() > at:
            parts.append({"type": "text", "text": text[at:match.start()]})
        python, output = match.groups()
        parts.append({"type": "python", "text": python} if python is not None
                     else {"type": "python_output", "text": output})
        at = match.end()
    if not parts:
        return text
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts


def parse_messages(value, limits: Limits, roles=ROLES) -> list[dict]:
    if not isinstance(value, list):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", param="messages",
                       code="invalid_type")
    if not value:
        raise ApiError(400, "'messages' is empty", param="messages")
    if len(value) > limits.max_messages:
        raise ApiError(422, f"too many messages: {len(value)} (at most {limits.max_messages})", param="messages",
                       code="out_of_range")
    messages, total = [], 0
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        if m.get("role") == "developer" and "system" in roles:  # newer OpenAI clients' name for it
            m = {**m, "role": "system"}
        if m["role"] not in roles:
            raise ApiError(400, f"messages[{i}].role {m['role']!r} is not one of {', '.join(roles)}",
                           param="messages", code="invalid_role")
        text = content_text(m["content"], i)
        if not text and m["role"] != "assistant":  # a model may answer nothing at all
            raise ApiError(400, f"messages[{i}] has empty content", param="messages")
        if len(text) > limits.max_message_chars:
            raise ApiError(422, f"messages[{i}] has {len(text):,} characters (at most "
                                f"{limits.max_message_chars:,})", param="messages", code="out_of_range")
        total += len(text)
        messages.append({"role": m["role"], "content": assistant_parts(text) if m["role"] == "assistant" else text})
    if total > limits.max_total_chars:
        raise ApiError(422, f"the messages have {total:,} characters in all (at most {limits.max_total_chars:,})",
                       param="messages", code="out_of_range")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", param="messages")
    return messages


def parse_chat_request(body: dict, defaults: dict, limits: Limits, openai: bool) -> ChatRequest:
    """The request of POST /v1/chat/completions (openai) or of the page's POST /chat/completions
    (user and assistant messages, temperature, top_k, max_tokens; always streamed). Unknown fields
    are ignored, as OpenAI's clients send fields we do not use."""
    messages = parse_messages(body.get("messages"), limits, ROLES if openai else ("user", "assistant"))
    max_tokens = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else None
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    r = ChatRequest(messages=messages,
                    max_tokens=number(body, name, defaults["max_tokens"], 1, limits.max_tokens, integer=True),
                    temperature=number(body, "temperature", defaults["temperature"], 0, 2),
                    top_k=number(body, "top_k", defaults["top_k"], 0, limits.max_top_k, integer=True),
                    stream=True)
    if not openai:
        return r
    r.top_p = number(body, "top_p", None, 0, 1, lo_open=True)
    r.seed = number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    r.n = number(body, "n", 1, 1, limits.max_n, integer=True)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop", code="invalid_type")
    if len(stops) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(422, f"at most {limits.max_stops} stop strings of at most {limits.max_stop_chars} characters",
                       param="stop", code="out_of_range")
    r.stop = stops
    for flag in ("stream", "logprobs"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise ApiError(400, f"'{flag}' must be true or false", param=flag, code="invalid_type")
    r.stream = bool(body.get("stream"))
    top = number(body, "top_logprobs", None, 0, limits.max_top_logprobs, integer=True)
    if top is not None and not body.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    r.logprobs = (top or 0) if body.get("logprobs") else None
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    r.include_usage = bool((options or {}).get("include_usage"))
    return r


def render_prompt(tokenizer, messages: list[dict], context: int) -> list[int]:
    """The prompt tokens (a system message merged as the chat format does); 400 when the roles do
    not alternate or the conversation leaves the model no room to answer."""
    try:
        ids = tokenizer.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]},
                                              max_tokens=context + 1)
    except ConversationError as e:
        raise ApiError(400, str(e), param="messages") from None
    if len(ids) >= context:
        raise ApiError(400, f"the conversation is {len(ids):,} tokens; the model reads at most {context:,}, "
                            "with room left to answer", param="messages", code="context_length_exceeded")
    return ids


# ---------------------------------------------------------------------------
# Workers


@dataclass
class Worker:
    id: int
    engine: object
    label: str  # the device, for /stats


class WorkerPool:
    """Free workers and the requests waiting for one, strictly first come first served: a released
    worker goes to the longest waiter, never to a newcomer that arrives at the same moment."""

    def __init__(self, workers: list[Worker], max_queue: int):
        self.workers, self.max_queue = workers, max_queue
        self.free = collections.deque(workers)
        self.waiters = collections.deque()  # futures of the waiting requests, oldest first
        self.served = 0
        self.busy = set()  # ids of the workers handed out

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    async def acquire(self) -> Worker:
        if self.free and not self.waiters:
            worker = self.free.popleft()
            self.busy.add(worker.id)
            return worker
        if len(self.waiters) >= self.max_queue:
            raise ApiError(503, f"server busy: all {len(self.workers)} worker(s) are generating and "
                                f"{len(self.waiters)} request(s) wait; try again shortly", code="queue_full")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:  # the client left while waiting
            if waiter.done() and not waiter.cancelled():
                self.hand(waiter.result())  # handed over just as it left: pass it on
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            raise

    def release(self, worker: Worker):
        self.served += 1
        self.hand(worker)

    def hand(self, worker: Worker):
        self.busy.discard(worker.id)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.busy.add(worker.id)
                waiter.set_result(worker)
                return
        self.free.append(worker)


# ---------------------------------------------------------------------------
# One generation


class Row:
    """One choice: its tokens, what of their text was sent, and why it ended."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens, self.logprobs = [], []
        self.text, self.sent = "", 0  # decoded so far; characters of it sent
        self.finish = None  # "stop" or "length"
        self.part, self.part_tokens, self.part_sent = "text", [], 0  # for the page's tool boxes

    def add(self, token: int, stop_tokens, logprob=None) -> str:
        """Append a token; returns the text that can be sent now ("" if none)."""
        if token in stop_tokens:
            self.finish = "stop"
            return self.flush()
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append((token, *logprob))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""  # half a character: wait for the rest
        self.text = text
        # only the unsent tail can hold a new match (stop strings are short: Limits.max_stop_chars)
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        for s in self.stops:
            at = text.find(s, start)
            if at >= 0:
                self.text, self.finish = text[:at], "stop"
                return self.flush()
        # a tail that is a prefix of a stop string may still become one
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        return self.take(len(text) - hold)

    def take(self, upto: int) -> str:
        delta = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta

    def flush(self) -> str:
        return self.take(len(self.text))

    def part_delta(self, token: int, specials: dict) -> tuple[str, str] | None:
        """The page's stream: (part, text) for this token, the tool's delimiters turned into part
        changes (text, python, output) rather than text."""
        if token in specials:
            self.part, self.part_tokens, self.part_sent = specials[token], [], 0
            return None
        self.part_tokens.append(token)
        text = self.tokenizer.decode(self.part_tokens)
        if text.endswith("\ufffd"):
            return None
        delta, self.part_sent = text[self.part_sent:], len(text)
        return (self.part, delta) if delta else None


async def generate(worker: Worker, prompt: list[int], req: ChatRequest, on_column):
    """Run the request on the worker's engine in a thread; await on_column(column, info) for each
    token column (info: per-row logprobs or None), in order. If this coroutine is cancelled (the
    client went away) or on_column returns False, the thread stops at its next token; this returns
    only once the thread has stopped, so the caller may then release the worker."""
    engine = worker.engine
    room = engine.model.rotary_len - len(prompt)
    max_tokens = min(req.max_tokens, room)
    loop = asyncio.get_running_loop()
    columns = asyncio.Queue()
    stop = threading.Event()
    seed = req.seed if req.seed is not None else random.randrange(2**62)

    device = next(engine.model.parameters()).device

    def work():
        try:
            # a thread starts on GPU 0: kernels and caches must go to this worker's own GPU
            if device.type == "cuda":
                torch.cuda.set_device(device)
            for item in engine.generate(prompt, req.n, max_tokens=max_tokens, temperature=req.temperature,
                                        top_k=req.top_k or None, seed=seed, top_p=req.top_p, logprobs=req.logprobs):
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(columns.put_nowait, ("column", item))
        except Exception as e:  # reported to the request; the server keeps serving
            loop.call_soon_threadsafe(columns.put_nowait, ("error", e))
        finally:
            loop.call_soon_threadsafe(columns.put_nowait, ("end", None))

    thread = threading.Thread(target=work, name=f"generate-{worker.id}", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = await columns.get()
            if kind == "end":
                return max_tokens
            if kind == "error":
                raise item
            if not stop.is_set() and await on_column(item[0], item[2] if len(item) > 2 else None) is False:
                stop.set()
    finally:
        stop.set()
        # the model is not free until the thread is out of it: wait without blocking the loop
        await asyncio.shield(asyncio.to_thread(thread.join))
