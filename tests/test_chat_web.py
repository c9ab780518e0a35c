"""chat-web: the real server (a subprocess on 127.0.0.1 over the tiny base checkpoint) driven by the
official openai client and by raw HTTP: answers, usage counts, seeds, stop strings, logprobs,
every limit and malformed body, the API key, a full queue and a client that leaves mid-stream."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import REPO, free_port

from picochat.serve import Limits

KEY = "test-key"
MODEL = "picochat-base-d2"


@pytest.fixture(scope="module")
def server(base_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("chat_web") / "home"
    shutil.copytree(base_home, home)
    port = free_port()
    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1", "PICOCHAT_DTYPE": "float32"}
    env.pop("PICOCHAT_API_KEY", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "chat-web", "-i", "base", "-p", str(port),
                             "--device-type", "cpu", "--api-key", KEY, "--max-queue", "4"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health").json()["ready"]:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the server did not come up:\n" + (home / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    yield url, home
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(base_home):
    from picochat.tokenizer import Tokenizer

    return Tokenizer.from_directory(base_home / "tokenizer")


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river."}]


def prompt_len(tokenizer, messages):
    # the chat format by hand: BOS, the system message merged into the first user turn, assistant start
    special = tokenizer.encode_special
    text = messages[0]["content"] + "\n\n" + messages[1]["content"]
    return len([tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode(text),
                special("<|user_end|>"), special("<|assistant_start|>")])


def test_models_and_a_plain_answer_with_exact_usage(client, tokenizer):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.0)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_len(tokenizer, MESSAGES)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_n_seed_and_max_completion_tokens(client):
    ask = lambda seed: client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=seed,
                                                      temperature=1.0, max_completion_tokens=10)
    a, b, c = ask(7), ask(7), ask(8)
    texts = lambda r: [ch.message.content for ch in r.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b) and texts(a) != texts(c)  # the same seed, the same answers
    assert len(set(texts(a))) > 1  # the n samples differ from each other
    assert a.usage.completion_tokens <= 30


def test_stream_matches_the_answer_and_counts_usage(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0.0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_cut_the_answer_streamed_or_not(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0.0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 8
    stop = full[5:8]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(**kwargs, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the likeliest one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace").startswith(
        r.choices[0].message.content[:1])



def streamed_logprobs(chunks, n=1):
    """The logprobs entries of each choice, gathered from a stream's chunks."""
    out = [[] for _ in range(n)]
    for ch in chunks:
        for choice in ch.choices:
            if choice.logprobs is not None:
                out[choice.index] += [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                                      for e in choice.logprobs.content]
    return out


@pytest.mark.parametrize("stop", [None, "STOP-AT"])
def test_streamed_logprobs_are_the_answers_with_n(client, stop):
    """n=2 sampled with a seed: the stream gives each choice the same text and every logprob entry
    of the non-streamed answer (also the entries of tokens whose text a stop string swallowed)."""
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3, n=2,
                  logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs)
    if stop:  # a stop string that starts at a token's first character: its tokens send no text
        pieces = [e.token for e in whole.choices[0].logprobs.content]
        for k in range(1, len(pieces) - 1):
            before, stop = "".join(pieces[:k]), (pieces[k] + pieces[k + 1])[:2]
            if len(stop) == 2 and "\ufffd" not in stop and (before + stop).find(stop) == len(before) \
                    and not before.endswith(stop[0]):
                break
        else:
            pytest.fail(f"no usable stop string in {pieces}")
    whole = client.chat.completions.create(**kwargs, stop=stop)
    chunks = list(client.chat.completions.create(**kwargs, stop=stop, stream=True))
    texts = ["", ""]
    finishes = [None, None]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    expected = [[(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in c.logprobs.content]
                for c in whole.choices]
    assert streamed_logprobs(chunks, 2) == expected
    if stop:  # the case this checks: the stop string's token is only in the finish chunk
        assert any(c.finish_reason == "stop" and c.logprobs for ch in chunks for c in ch.choices)
    assert [len(e) for e in expected] == [len(c.logprobs.content) for c in whole.choices]


def test_a_chunked_body_without_content_length(server):
    def body():
        raw = json.dumps({"messages": user(), "max_tokens": 3}).encode()
        yield raw[:10]
        yield raw[10:]

    r = httpx.post(server[0] + "/v1/chat/completions", content=body(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    def big():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(Limits().max_body_bytes // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(server[0] + "/v1/chat/completions", content=big(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_cross_site_requests_are_refused(server):
    """A page elsewhere can POST text/plain or a form without a preflight, or reach 127.0.0.1 by a
    name of its own (DNS rebinding): neither gets an answer."""
    url, auth = server[0], {"Authorization": f"Bearer {KEY}"}
    raw = json.dumps({"messages": user(), "max_tokens": 2})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        for path in ("/v1/chat/completions", "/chat/completions"):
            r = httpx.post(url + path, content=raw, headers={**auth, **({"Content-Type": kind} if kind else {})})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (kind, r.text)
    r = httpx.post(url + "/v1/chat/completions", content=raw,
                   headers={**auth, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        r = httpx.get(url + "/", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    assert httpx.get(url + "/health", headers={"Host": "localhost"}).status_code == 200

def post(url, body=None, raw=None, key=KEY, path="/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is None:
        raw = json.dumps(body).encode()
    return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)


def user(text="hi"):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("raw, body, status, code", [
    (b"{not json", None, 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, 400, "invalid_encoding"),
    (None, [1, 2], 400, None),
    (None, {"messages": []}, 400, None),
    (None, {"messages": "hi"}, 400, "invalid_type"),
    (None, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_role"),
    (None, {"messages": [{"role": "user", "content": ""}]}, 400, None),
    (None, {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    (None, {"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
    (None, {"messages": user(), "temperature": "hot"}, 400, "invalid_type"),
    (None, {"messages": user(), "temperature": 2.5}, 422, "out_of_range"),
    (None, {"messages": user(), "top_k": 201}, 422, "out_of_range"),
    (None, {"messages": user(), "max_tokens": 0}, 422, "out_of_range"),
    (None, {"messages": user(), "max_tokens": 4097}, 422, "out_of_range"),
    (None, {"messages": user(), "top_p": 0}, 422, "out_of_range"),
    (None, {"messages": user(), "n": 9}, 422, "out_of_range"),
    (None, {"messages": user(), "stop": 3}, 400, "invalid_type"),
    (None, {"messages": user(), "stream": "yes"}, 400, "invalid_type"),
    (None, {"messages": user("x" * 8001)}, 422, "out_of_range"),
    (None, {"messages": user("x") * 501}, 422, "out_of_range"),
    (None, {"messages": [{"role": "user", "content": "x" * 8000}] * 5}, 422, "out_of_range"),
    (None, {"messages": user(), "model": "gpt-5"}, 404, "model_not_found"),
    (None, {"messages": user(), "model": 5}, 400, "invalid_type"),
    (None, {"messages": user(), "stop": ["x" * 257]}, 422, "out_of_range"),
    (b"[" * 200000 + b"]" * 200000, None, 400, "invalid_json"),
])
def test_bad_requests_get_the_documented_status_and_shape(server, raw, body, status, code):
    r = post(server[0], body, raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_body_size_unknown_fields_paths_and_key(server):
    url = server[0]
    big = json.dumps({"messages": user("x" * (Limits().max_body_bytes + 10))}).encode()
    r = post(url, raw=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(url, {"messages": user(), "max_tokens": 3, "frequency_penalty": 0.5, "user": "me", "tools": None})
    assert r.status_code == 200  # unknown fields are ignored
    r = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    for key in (None, "wrong"):
        r = post(url, {"messages": user()}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}).status_code \
            == 401
    assert httpx.get(url + "/health").status_code == 200  # no key needed
    stats = httpx.get(url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["workers"] == [{"id": 0, "device": "cpu", "busy": False}] and stats["served"] > 0
    health = httpx.get(url + "/health").json()
    assert health["model_id"] == MODEL and health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 512}


def test_the_page_stream(server):
    r = post(server[0], {"messages": user("Hello there"), "max_tokens": 10, "temperature": 0.0},
             path="/chat/completions")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in r.text.split("\n\n") if line]
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu", "part"} and e["part"] in ("text", "python", "output")
               for e in events[:-1])
    r = post(server[0], {"messages": [{"role": "system", "content": "x"}, *user()]}, path="/chat/completions")
    assert r.status_code == 400  # the page's endpoint takes user and assistant messages only


def stream_body(max_tokens, seed=0):
    return {"model": MODEL, "messages": user("Tell me a long story"), "max_tokens": max_tokens, "stream": True,
            "temperature": 1.0, "seed": seed}


async def stream_once(ac, url, body):
    """(status, seconds, text) of a streamed request read to the end."""
    t0 = time.perf_counter()
    async with ac.stream("POST", url + "/v1/chat/completions", json=body) as r:
        text = "".join([chunk async for chunk in r.aiter_text()])
        return r.status_code, time.perf_counter() - t0, text


def test_32_concurrent_streams_finish_or_get_503_and_health_answers(server):
    url = server[0]

    async def main():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as ac:
            streams = [asyncio.create_task(stream_once(ac, url, stream_body(8, seed=i))) for i in range(32)]
            healths = []
            while not all(t.done() for t in streams):
                t0 = time.perf_counter()
                r = await ac.get(url + "/health")
                healths.append((r.status_code, time.perf_counter() - t0))
                await asyncio.sleep(0.05)
            return [t.result() for t in streams], healths

    results, healths = asyncio.run(main())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 5  # 1 worker + a queue of 4, at least
    assert statuses.count(503) > 0  # 32 at once overflow a queue of 4
    for status, _, text in results:
        if status == 200:
            assert text.rstrip().endswith("data: [DONE]")
        else:
            assert json.loads(text)["error"]["code"] == "queue_full"
    assert healths and all(code == 200 for code, _ in healths)
    assert max(seconds for _, seconds in healths) < 2.0  # the event loop is never blocked by generation


def test_a_client_that_leaves_frees_the_worker(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    # a seed whose answer runs long, so an abandoned generation would hold the worker a while
    for seed in range(20):
        r = post(url, {**stream_body(400, seed), "stream": False})
        if r.json()["usage"]["completion_tokens"] >= 300:
            break
    else:
        pytest.fail("no seed gave a long answer")

    async def main():
        async with httpx.AsyncClient(headers=headers, timeout=120) as ac:
            _, whole, _ = await stream_once(ac, url, stream_body(400, seed))
            async with ac.stream("POST", url + "/v1/chat/completions", json=stream_body(400, seed)) as r:
                async for _ in r.aiter_bytes():
                    break  # the first chunk, then the client leaves
            t0 = time.perf_counter()
            while (await ac.get(url + "/health")).json()["available_workers"] != 1:
                if time.perf_counter() - t0 > 3 * whole + 10:
                    pytest.fail("the worker of the abandoned stream never came back")
                await asyncio.sleep(0.01)
            freed = time.perf_counter() - t0
            status, _, _ = await stream_once(ac, url, stream_body(4, seed))
            # and not streamed: the client gives up (a timeout) a moment into the same long answer
            asked = asyncio.create_task(ac.post(url + "/v1/chat/completions", json={**stream_body(400, seed),
                                                                                 "stream": False}))
            await asyncio.sleep(0.1)
            asked.cancel()
            t0 = time.perf_counter()
            while (await ac.get(url + "/health")).json()["available_workers"] != 1:
                if time.perf_counter() - t0 > 3 * whole + 10:
                    pytest.fail("the worker of the abandoned request never came back")
                await asyncio.sleep(0.01)
            return whole, max(freed, time.perf_counter() - t0), status

    whole, freed, status = asyncio.run(main())
    assert status == 200
    assert freed < whole / 3, f"the worker came back {freed:.2f} s after the disconnect; a whole answer: {whole:.2f} s"


def test_help_and_errors():
    done = subprocess.run([sys.executable, "-m", "picochat", "chat-web", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0 and "--api-key" in done.stdout and "--log-conversations" in done.stdout
    env = {**os.environ, "PICOCHAT_HOME": "/nonexistent/picochat-home"}
    done = subprocess.run([sys.executable, "-m", "picochat", "chat-web", "--device-type", "cpu"], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "no model checkpoints" in done.stderr


def test_history_with_tool_calls_and_an_empty_answer(client, tokenizer):
    """An earlier answer sent back as the server wrote it, its tool call between the delimiters,
    is read as the chat format's parts (special tokens, not their text); an empty answer is fine."""
    special = tokenizer.encode_special
    earlier = "Let me add.<|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>It is 4."
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": earlier},
                {"role": "user", "content": "And?"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "Well?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0.0)
    ids = [tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode("2+2?"), special("<|user_end|>"),
           special("<|assistant_start|>"), *tokenizer.encode("Let me add."), special("<|python_start|>"),
           *tokenizer.encode("2+2"), special("<|python_end|>"), special("<|output_start|>"), *tokenizer.encode("4"),
           special("<|output_end|>"), *tokenizer.encode("It is 4."), special("<|assistant_end|>"),
           special("<|user_start|>"), *tokenizer.encode("And?"), special("<|user_end|>"),
           special("<|assistant_start|>"), special("<|assistant_end|>"),
           special("<|user_start|>"), *tokenizer.encode("Well?"), special("<|user_end|>"),
           special("<|assistant_start|>")]
    assert r.usage.prompt_tokens == len(ids)


def test_a_failed_generation_is_a_500_and_the_server_goes_on(base_home, monkeypatch, capsys):
    """The app in process (the real worker, checkpoint and engine) with one fault injected into
    the model's forward: that request gets a 500 in OpenAI's shape (streamed too when the very first
    forward fails; an error event when a later one does), its worker comes back, and the next
    request is served."""
    from picochat.serve import WorkerPool
    from picochat.stages import chat_web

    monkeypatch.setenv("PICOCHAT_HOME", str(base_home))
    server = chat_web.load_workers(chat_web.ChatWebConfig(source="base", device_type="cpu"))
    app = chat_web.build_app(server)
    model = server.workers[0].engine.model
    forward, faults = model.forward, []  # faults: forwards to let through before failing

    def failing(*args, **kwargs):
        if faults:
            faults[0] -= 1
            if faults[0] < 0:
                faults.pop()
                raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    body = {"messages": user(), "max_tokens": 3}

    async def main():
        server.pool = WorkerPool(server.workers, 4)  # what the app's startup does
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
            faults.append(0)
            r = await ac.post("/v1/chat/completions", json=body)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "RuntimeError" in r.json()["error"]["message"]
            assert "injected fault" in capsys.readouterr().err  # the details are in the server's log
            assert len(server.pool.free) == 1
            for path in ("/v1/chat/completions", "/chat/completions"):
                faults.append(0)
                r = await ac.post(path, json={**body, "stream": True})
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
                assert len(server.pool.free) == 1
            faults.append(1)  # the prefill works, the first decode step fails
            r = await ac.post("/v1/chat/completions", json={**body, "stream": True, "temperature": 0})
            assert r.status_code == 200 and '"error"' in r.text and "injected fault" in r.text
            assert len(server.pool.free) == 1
            r = await ac.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    asyncio.run(main())


def test_two_workers_serve_two_requests_at_once(base_home, monkeypatch):
    """-n 2 as on two GPUs, here two CPU workers built the way load_workers builds them: two
    concurrent requests run on different workers at the same time, a third waits for whichever
    frees first, and /stats counts them."""
    import torch

    from picochat.engine import load_engine
    from picochat.serve import Worker, WorkerPool
    from picochat.stages import chat_web

    monkeypatch.setenv("PICOCHAT_HOME", str(base_home))
    server = chat_web.load_workers(chat_web.ChatWebConfig(source="base", device_type="cpu"))
    engine, _ = load_engine("base", torch.device("cpu"), torch.float32)
    server.workers.append(Worker(1, engine, "cpu"))
    app = chat_web.build_app(server)
    body = {"messages": user("Tell me a story."), "max_tokens": 24, "temperature": 1.0, "seed": 1}

    async def main():
        server.pool = WorkerPool(server.workers, 4)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as ac:
            replies = await asyncio.gather(*(ac.post("/chat/completions", json=body) for _ in range(3)))
            stats = (await ac.get("/stats")).json()
        used = []
        for r in replies:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == {"done": True}
            used.append({e["gpu"] for e in events if "gpu" in e})
        assert all(len(u) == 1 for u in used) and set.union(*used) == {0, 1}
        assert stats["served"] == 3 and stats["available_workers"] == 2 and stats["queued"] == 0

    asyncio.run(main())


def test_serves_an_exported_folder(base_home, tmp_path, monkeypatch):
    from picochat.stages import chat_web, export

    monkeypatch.setenv("PICOCHAT_HOME", str(base_home))
    folder = export.run(export.ExportConfig(source="base", model_tag="d2", output=str(tmp_path / "shared")))
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "empty"))  # the folder is all it needs
    server = chat_web.load_workers(chat_web.ChatWebConfig(source="hf", path=str(folder), device_type="cpu"))
    assert server.model_id == "picochat-hf-shared" and server.description == "hf shared step 40"
