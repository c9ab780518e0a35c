"""`picochat chat-web`: a chat page and an OpenAI-compatible API over one checkpoint (FastAPI +
uvicorn), solid enough to leave running.

Endpoints:
  GET  /                      the chat page (picochat/web/ui.html: one file, works offline)
  GET  /health                status, workers free, the model and the sampling defaults (no key needed)
  GET  /stats                 workers, their devices and what they served
  GET  /v1/models             the one model, by the id requests name
  POST /v1/chat/completions   OpenAI's chat completions: streamed (server-sent chunks ending with
                              data: [DONE]) or not; n, stop, seed, top_p, top_k, logprobs, usage
  POST /chat/completions      the page's stream: data: {"token", "gpu", "part"} events, then
                              data: {"done": true}; part is text, python (a tool call) or output
One model and engine per worker (-n GPUs; one on the CPU). Requests wait for a free worker in a
queue of --max-queue; past that they get 503. With --api-key (or PICOCHAT_API_KEY) every endpoint
but / and /health needs "Authorization: Bearer <key>". Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}. Content holds what the model wrote, its tool
calls as <|python_start|>...<|python_end|> and their results as <|output_start|>...<|output_end|>.
Conversations are not logged unless --log-conversations.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat import serve
from picochat.cli import HelpFormatter
from picochat.common import PicochatError, compute_init
from picochat.engine import MODEL_SOURCES, load_engine, resolve_model
from picochat.serve import ApiError, Limits, Row, Worker, WorkerPool

PAGE = Path(__file__).resolve().parent.parent / "web" / "ui.html"


@dataclass
class ChatWebConfig:
    source: str | None = None  # base, sft, rl or hf (None: the most trained stage with a checkpoint)
    model_tag: str | None = None
    step: int | None = None
    path: str | None = None  # with source hf: the exported folder
    num_workers: int = 1  # GPUs, one model each
    temperature: float = 0.8  # defaults for requests that do not say
    top_k: int = 50
    max_tokens: int = 512
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: PICOCHAT_API_KEY, if set
    max_queue: int = 16  # requests that may wait for a worker
    log_conversations: bool = False
    device_type: str = ""


class Server:
    """The loaded workers and what every request needs to know."""

    def __init__(self, c: ChatWebConfig, workers: list[Worker], source: str, tag: str, step: int):
        self.c, self.workers, self.limits = c, workers, Limits()
        self.model_id = f"picochat-{source}-{tag}"
        self.description = f"{source} {tag} step {step}"
        self.created = int(time.time())
        self.defaults = {"temperature": c.temperature, "top_k": c.top_k, "max_tokens": c.max_tokens}
        engine = workers[0].engine
        self.tokenizer, self.context = engine.tokenizer, engine.model.rotary_len
        self.stop_tokens = engine.stop_tokens
        self.specials = {engine.python_start: "python", engine.python_end: "text",
                         engine.output_start: "output", engine.output_end: "text"}
        self.pool = None  # made inside the event loop

    def log(self, kind: str, messages, answers):
        if self.c.log_conversations:
            print(json.dumps({"time": time.time(), "endpoint": kind, "messages": messages, "answers": answers}),
                  flush=True)


def load_workers(c: ChatWebConfig):
    source, tag, step = resolve_model(c.source, c.model_tag, c.step, c.path)
    rt = compute_init(c.device_type)
    if rt.device.type == "cuda":
        if c.num_workers > torch.cuda.device_count():
            raise PicochatError(f"-n {c.num_workers} workers need as many GPUs; {torch.cuda.device_count()} visible")
        devices = [torch.device("cuda", i) for i in range(c.num_workers)]
    elif c.num_workers != 1:
        raise PicochatError(f"-n {c.num_workers}: on {rt.device.type} there is one worker (-n 1)")
    else:
        devices = [rt.device]
    workers = []
    for i, device in enumerate(devices):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # compiled kernels and caches built for this GPU
        engine, _ = load_engine(source, device, rt.dtype, tag, step, c.path)
        workers.append(Worker(i, engine, str(device)))
        print(f"worker {i}: {source} {tag} step {step} on {device} ({rt.dtype})", flush=True)
    return Server(c, workers, source, tag, step)


async def read_body(request, limits: Limits) -> bytes:
    """The body, refusing more than the limit before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {int(declared):,} bytes is over the limit of "
                            f"{limits.max_body_bytes:,}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes:,} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def logprob_entries(tokenizer, entries) -> list[dict]:
    """OpenAI's logprobs.content items for (token, logprob, [(token, logprob)...]) entries."""
    def one(token, logprob):
        raw = tokenizer.decode_single_token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]} for t, lp, top in entries]


class RequireKey:
    """ASGI middleware: 401 unless "Authorization: Bearer <key>", except for the page and /health.
    Plain ASGI rather than an http middleware, which would sit between a stream and its client's
    disconnect."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in ("/", "/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                from fastapi.responses import JSONResponse

                e = ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
                return await JSONResponse(e.body(), status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


class CheckHost:
    """ASGI middleware: 400 unless the Host header names this machine as it listens. A page on
    another site can point a name of its own at 127.0.0.1 (DNS rebinding) and then read the answers;
    its requests carry that name. Servers listening on every address (0.0.0.0) accept any name."""

    def __init__(self, app, host: str):
        self.app = app
        self.allowed = {"localhost", "127.0.0.1", "::1", host.strip("[]").lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = given[1:].split("]")[0] if given.startswith("[") else given.split(":")[0]
            if name not in self.allowed:
                from fastapi.responses import JSONResponse

                e = ApiError(400, f"Host {given!r} is not this server's name; it answers to "
                                  f"{', '.join(sorted(self.allowed))} (listen with --host 0.0.0.0 to accept any)",
                             code="invalid_host")
                return await JSONResponse(e.body(), status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(server: Server):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.pool = WorkerPool(server.workers, server.c.max_queue)  # its queue belongs to this loop
        yield

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if server.c.api_key:
        app.add_middleware(RequireKey, key=server.c.api_key)
    if server.c.host not in ("0.0.0.0", "::", ""):
        app.add_middleware(CheckHost, host=server.c.host)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = f"no such endpoint: {request.method} {request.url.path}" if e.status_code in (404, 405) \
            else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message, code="not_found" if e.status_code == 404
                                     else None).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        print(f"error serving {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return JSONResponse(ApiError(500, f"generation failed ({type(e).__name__}); the server log has the details")
                            .body(), status_code=500)

    @app.get("/")
    async def page():
        if not PAGE.exists():
            raise ApiError(404, f"the chat page is missing from this installation ({PAGE})")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        pool = server.pool
        return {"status": "ok", "ready": pool is not None, "num_workers": len(server.workers),
                "available_workers": len(pool.free) if pool else 0, "queued": pool.waiting if pool else 0,
                "model": server.description, "model_id": server.model_id, "defaults": server.defaults}

    @app.get("/stats")
    async def stats():
        pool = server.pool
        if pool is None:
            raise ApiError(503, "starting up", code="not_ready")
        return {"num_workers": len(server.workers), "available_workers": len(pool.free), "queued": pool.waiting,
                "served": pool.served, "max_queue": server.c.max_queue,
                "workers": [{"id": w.id, "device": w.label, "busy": w.id in pool.busy} for w in server.workers]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "picochat"}]}

    async def prepare(request: Request, openai: bool):
        # JSON only: a cross-site page can send text/plain or form bodies without asking the
        # browser first (no CORS preflight), so without a key those would reach the model
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})",
                           code="unsupported_media_type")
        body = serve.parse_body(await read_body(request, server.limits), server.limits)
        if openai and body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
        if openai and body.get("model") not in (None, server.model_id):
            raise ApiError(404, f"model {body.get('model')!r} is not served here; this server has "
                                f"{server.model_id!r}", param="model", code="model_not_found")
        req = serve.parse_chat_request(body, server.defaults, server.limits, openai)
        prompt = serve.render_prompt(server.tokenizer, req.messages, server.context)
        return req, prompt

    async def stream(worker, produce):
        """A StreamingResponse of what produce(put) emits; the worker is released when the
        generation has stopped, also when the client leaves mid-stream. The status waits for the
        first event: a generation that fails before it (its first forward) is a plain 500."""
        queue = asyncio.Queue()
        first = asyncio.get_running_loop().create_future()

        def put(item):
            if not first.done():
                first.set_result(None)
            queue.put_nowait(item)

        async def run():
            try:
                await produce(put)
            except Exception as e:
                if not first.done():
                    first.set_exception(e)
                    return
                # mid-stream the status is sent already: report in the stream
                print(f"generation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                queue.put_nowait(sse({"error": ApiError(500, f"generation failed: {e}").body()["error"]}))
            finally:
                # here, not in events(): this task outlives the response, and generate() has
                # stopped its thread before it returns, also when cancelled
                server.pool.release(worker)
                queue.put_nowait(None)
                if not first.done():
                    first.set_result(None)

        # started now, not when the body is first read: a client gone before that would leave a
        # generator that never runs, and its worker would never come back
        task = asyncio.create_task(run())
        try:
            await first
        except BaseException:
            task.cancel()
            raise

        async def events():
            try:
                while (item := await queue.get()) is not None:
                    yield item
            finally:
                # no await here: a client that left cancels this generator for good, and any
                # await would be cancelled again before it could finish
                task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/chat/completions")
    async def page_completions(request: Request):
        req, prompt = await prepare(request, openai=False)
        worker = await server.pool.acquire()
        row = Row(server.tokenizer, [])
        pieces = []

        async def produce(put):
            async def on_column(column, _):
                token = column[0]
                if token in server.stop_tokens:
                    return False
                row.tokens.append(token)
                delta = row.part_delta(token, server.specials)
                if delta:
                    pieces.append(delta)
                    put(sse({"token": delta[1], "gpu": worker.id, "part": delta[0]}))
                return True

            await serve.generate(worker, prompt, req, on_column)
            put(sse({"done": True}))
            server.log("/chat/completions", req.messages, [server.tokenizer.decode(row.tokens)])

        return await stream(worker, produce)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        req, prompt = await prepare(request, openai=True)
        worker = await server.pool.acquire()
        rows = [Row(server.tokenizer, req.stop) for _ in range(req.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": sum(len(r.tokens) for r in rows),
                         "total_tokens": len(prompt) + sum(len(r.tokens) for r in rows)}

        def finish_rows():
            for r in rows:
                if r.finish is None:  # ran out of tokens (or of the model's context)
                    r.finish = "length"

        if not req.stream:
            async def on_column(column, info):
                for i, (r, token) in enumerate(zip(rows, column)):
                    if r.finish is None:
                        r.add(token, server.stop_tokens, info[i] if info else None)
                return any(r.finish is None for r in rows)

            async def client_gone():
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            # a client that leaves before the answer (e.g. a timed-out retry) stops the generation
            generation, gone = asyncio.create_task(serve.generate(worker, prompt, req, on_column)), \
                asyncio.create_task(client_gone())
            try:
                await asyncio.wait({generation, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                generation.cancel()  # a no-op once it is done
                gone.cancel()
                await asyncio.gather(generation, gone, return_exceptions=True)  # the thread has stopped
                server.pool.release(worker)
            if generation.cancelled():
                return JSONResponse(ApiError(499, "the client closed the request").body(), status_code=499)
            generation.result()  # a failed generation raises here: 500
            finish_rows()
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": None if req.logprobs is None
                        else {"content": logprob_entries(server.tokenizer, r.logprobs)},
                        "finish_reason": r.finish} for i, r in enumerate(rows)]
            server.log("/v1/chat/completions", req.messages, [r.text for r in rows])
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": server.model_id,
                                 "choices": choices, "usage": usage(), "system_fingerprint": None})

        def chunk(choices, with_usage=None):
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                   "choices": choices}
            if req.include_usage:
                out["usage"] = with_usage
            return sse(out)

        async def produce(put):
            opened = False  # the role chunk goes out with the first token: a failed first forward is a 500
            pending = [0] * req.n  # logprob entries not yet sent, per row

            def open_stream():
                nonlocal opened
                if not opened:
                    opened = True
                    put(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(req.n)]))

            def entries(i, r):
                if req.logprobs is None or pending[i] == len(r.logprobs):
                    return None
                out = {"content": logprob_entries(server.tokenizer, r.logprobs[pending[i]:])}
                pending[i] = len(r.logprobs)
                return out

            def send(i, r, delta):
                put(chunk([{"index": i, "delta": {"content": delta}, "logprobs": entries(i, r),
                             "finish_reason": None}]))

            def finish(i, r):
                # tokens whose text was never sent (a stop string's own, half a character) still
                # have their logprobs, as in the non-streamed answer
                put(chunk([{"index": i, "delta": {}, "logprobs": entries(i, r), "finish_reason": r.finish}]))

            async def on_column(column, info):
                open_stream()
                for i, (r, token) in enumerate(zip(rows, column)):
                    if r.finish is not None:
                        continue
                    delta = r.add(token, server.stop_tokens, info[i] if info else None)
                    if delta:
                        send(i, r, delta)
                    if r.finish is not None:
                        finish(i, r)
                return any(r.finish is None for r in rows)

            await serve.generate(worker, prompt, req, on_column)
            open_stream()
            finish_rows()
            for i, r in enumerate(rows):
                if r.finish == "length":
                    delta = r.flush()
                    if delta:
                        send(i, r, delta)
                    finish(i, r)
            if req.include_usage:
                put(chunk([], usage()))
            put(sse("[DONE]"))
            server.log("/v1/chat/completions", req.messages, [r.text for r in rows])

        return await stream(worker, produce)

    return app


def check_config(c: ChatWebConfig):
    if not 0 <= c.temperature <= 2 or not 0 <= c.top_k <= 200 or not 1 <= c.max_tokens <= 4096:
        raise PicochatError("defaults out of range: -t in [0, 2], -k in [0, 200], -m in [1, 4096]")
    if c.num_workers < 1 or c.max_queue < 0:
        raise PicochatError("-n must be at least 1 and --max-queue at least 0")
    if not 0 < c.port < 65536:
        raise PicochatError(f"-p/--port must be in 1..65535 (got {c.port})")


def run(c: ChatWebConfig):
    import uvicorn

    c.api_key = c.api_key or os.environ.get("PICOCHAT_API_KEY") or None
    check_config(c)
    server = load_workers(c)
    if c.host not in ("127.0.0.1", "localhost", "::1") and not c.api_key:
        print(f"warning: listening on {c.host} with no API key: anyone who can reach this port can use the model "
              "(set --api-key or PICOCHAT_API_KEY)", file=sys.stderr, flush=True)
    print(f"picochat chat-web: {server.description} as {server.model_id!r} on http://{c.host}:{c.port}/ "
          f"({len(server.workers)} worker(s), queue {c.max_queue})", flush=True)
    uvicorn.run(build_app(server), host=c.host, port=c.port, log_level="warning", timeout_graceful_shutdown=5)


def main(argv=None):
    d = ChatWebConfig()
    p = argparse.ArgumentParser(prog="picochat chat-web", formatter_class=HelpFormatter,
                                description="Serve a chat page and an OpenAI-compatible API "
                                            "(POST /v1/chat/completions) over one checkpoint or exported folder.")
    p.add_argument("-i", "--source", default=d.source, choices=MODEL_SOURCES,
                   help="checkpoint stage: base, sft or rl (if not given: the most trained one there is), or hf: "
                        "a folder written by picochat export, given by --path")
    p.add_argument("--path", default=d.path, help="with -i hf: the exported model folder")
    p.add_argument("-g", "--model-tag", default=d.model_tag, help="checkpoint folder (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=d.step, help="checkpoint step (default: the last one)")
    p.add_argument("-n", "--num-workers", type=int, default=d.num_workers,
                   help="workers, one model each, on GPUs 0..n-1 (one on the CPU)")
    p.add_argument("-t", "--temperature", type=float, default=d.temperature,
                   help="sampling temperature for requests that give none")
    p.add_argument("-k", "--top-k", type=int, default=d.top_k, help="top-k for requests that give none (0 = all)")
    p.add_argument("-m", "--max-tokens", type=int, default=d.max_tokens,
                   help="answer length in tokens for requests that give none")
    p.add_argument("--host", default=d.host,
                   help="address to listen on; 0.0.0.0 exposes the server to the network (set an API key then)")
    p.add_argument("-p", "--port", type=int, default=d.port, help="port to listen on")
    p.add_argument("--api-key", default=d.api_key,
                   help="require Authorization: Bearer <key> on every endpoint but / and /health "
                        "(default: PICOCHAT_API_KEY, if set)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests that may wait for a free worker; more get 503")
    p.add_argument("--log-conversations", action="store_true",
                   help="print each request's messages and answers to stdout (off: nothing is logged)")
    p.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu (if not given: autodetect)")
    run(ChatWebConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
