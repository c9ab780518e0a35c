"""Chat tasks: the Task framework, each task's conversations on small datasets in their real Hub
schemas (tests/chat_data.py), and the once-per-machine download from a mirror folder, a local
HTTP server and a stand-in for the Hub's listing endpoint, with its failure modes."""

import json
import random
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from chat_data import (
    ARC_SCHEMA,
    GSM8K_SCHEMA,
    HUMANEVAL_ROWS,
    HUMANEVAL_SCHEMA,
    MMLU_AUX_SCHEMA,
    MMLU_SCHEMA,
    SMOLTALK_SCHEMA,
    arc_rows,
    gsm8k_rows,
    mmlu_rows,
    smoltalk_rows,
    write_split,
    write_words,
)
from conftest import free_port

from picochat.common import PicochatError
from picochat.tasks import data
from picochat.tasks.arc import ARC
from picochat.tasks.common import Task, TaskMixture, TaskSequence, load_hub_dataset, render_mc
from picochat.tasks.customjson import CustomJSON
from picochat.tasks.gsm8k import GSM8K, answer_parts, extract_answer
from picochat.tasks.humaneval import HumanEval, build_program
from picochat.tasks.mmlu import MMLU
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spelling import SimpleSpelling, SpellingBee

WORDS = ["apple", "banana", "cherry", "kiwi", "strawberry"]
MC_SUFFIX = "\nRespond only with the letter of the correct answer."


class Numbers(Task):
    def __init__(self, n, tag="n", **slice_args):
        super().__init__(**slice_args)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "id": (self.tag, index)}


def ids(task):
    return [conversation["id"] for conversation in task]


def perm(n):
    return np.random.default_rng(42).permutation(n)


# ---------------------------------------------------------------------------
# Mirror, server, environment


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    write_split(root, "allenai/ai2_arc", "ARC-Easy", "test", arc_rows(7), ARC_SCHEMA, files=2)
    write_split(root, "cais/mmlu", "all", "test", mmlu_rows(6), MMLU_SCHEMA)
    write_split(root, "cais/mmlu", "auxiliary_train", "train", [{"train": r} for r in mmlu_rows(5, "law")],
                MMLU_AUX_SCHEMA)
    write_split(root, "openai/gsm8k", "main", "test", gsm8k_rows(50), GSM8K_SCHEMA, files=3)
    write_split(root, "openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, HUMANEVAL_SCHEMA)
    write_split(root, "HuggingFaceTB/smol-smoltalk", "default", "test", smoltalk_rows(4), SMOLTALK_SCHEMA)
    write_words(root, WORDS)
    return root


@pytest.fixture
def env(picochat_home, monkeypatch):
    """Fast failures (2 attempts, no backoff); returns a function that points the mirror variable somewhere."""
    monkeypatch.setattr(data, "ATTEMPTS", 2)
    monkeypatch.setattr(data, "BACKOFF", 0.0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    return lambda location: monkeypatch.setenv(data.MIRROR_ENV, str(location))


@pytest.fixture
def server(mirror):
    """The mirror folder over HTTP; hits counts the GETs per path, and delay slows every answer."""
    hits = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            time.sleep(srv.delay)
            super().do_GET()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(mirror)))
    srv.hits, srv.delay = hits, 0.0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------
# The framework


def test_task_slicing():
    assert ids(Numbers(4)) == [("n", i) for i in range(4)]
    task = Numbers(10, start=2, stop=9, step=3)
    assert len(task) == 3 and [i for _, i in ids(task)] == [2, 5, 8]
    assert task[-1]["id"] == ("n", 8)
    with pytest.raises(IndexError):
        task[3]
    assert len(Numbers(10, start=1, step=4)) == 3  # 1, 5, 9
    assert len(Numbers(10, stop=100)) == 10  # a stop past the end is the end, as in a slice
    assert len(Numbers(10, start=12)) == 0
    with pytest.raises(PicochatError, match="step >= 1"):
        Numbers(10, step=0)


def test_task_mixture_shuffles_once_and_oversamples():
    a, b = Numbers(3, "a"), Numbers(5, "b", start=1)
    tasks = [a, b, a]
    mixture = TaskMixture(tasks)
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert ids(mixture) == [tasks[t][i]["id"] for t, i in pairs]
    counts = Counter(tag for tag, _ in ids(mixture))
    assert counts == {"a": 6, "b": 4}
    assert ids(TaskMixture(tasks, start=2, step=2)) == ids(mixture)[2::2]


def test_task_sequence():
    sequence = TaskSequence([Numbers(2, "a"), Numbers(3, "b", start=1)])
    assert ids(sequence) == [("a", 0), ("a", 1), ("b", 1), ("b", 2)]
    assert ids(TaskSequence([Numbers(2, "a"), Numbers(3, "b")], start=1, stop=4)) == [("a", 1), ("b", 0), ("b", 1)]


def test_render_mc_exact():
    assert render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "five"]) == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- five=C\n\n"
        "Respond only with the letter of the correct answer.")


# ---------------------------------------------------------------------------
# Each task's conversations (from the mirror folder)


def test_arc(env, mirror):
    env(mirror)
    task = ARC("ARC-Easy", "test")
    rows = arc_rows(7)
    assert len(task) == 7 and task.eval_type == "categorical"
    row = rows[perm(7)[0]]
    i = int(row["id"][1:])
    conversation = task[0]
    assert conversation == {
        "messages": [{"role": "user", "content": f"Multiple Choice question: Which one is number {i}?\n"
                                                 f"- thing {i}=A\n- other {i}=B\n- third {i}=C\n" + MC_SUFFIX},
                     {"role": "assistant", "content": row["answerKey"]}],
        "letters": ["A", "B", "C"]}
    assert task.evaluate(conversation, row["answerKey"]) is True
    assert task.reward(conversation, "B" if row["answerKey"] != "B" else "A") == 0.0
    with pytest.raises(PicochatError, match="ARC subset"):
        ARC("ARC-Medium", "test")


def test_mmlu_all_and_nested_auxiliary_train(env, mirror):
    env(mirror)
    task = MMLU("all", "test")
    row = mmlu_rows(6)[perm(6)[0]]
    q = row["question"]
    assert task[0] == {
        "messages": [{"role": "user", "content": f"Multiple Choice question: {q}\n"
                      + "".join(f"- {c}={letter}\n" for c, letter in zip(row["choices"], "ABCD")) + MC_SUFFIX},
                     {"role": "assistant", "content": "ABCD"[row["answer"]]}],
        "subject": "anatomy", "letters": ["A", "B", "C", "D"]}
    aux = MMLU("auxiliary_train", "train")
    assert len(aux) == 5
    row = mmlu_rows(5, "law")[perm(5)[1]]
    assert aux[1]["subject"] == "law"
    assert aux[1]["messages"][1]["content"] == "ABCD"[row["answer"]]
    assert row["question"] in aux[1]["messages"][0]["content"]
    with pytest.raises(PicochatError, match="has no split 'train'"):
        MMLU("all", "train")


def test_gsm8k_tool_parts_from_tags():
    answer = "She has 3 * 4 = <<3*4=12>>12 eggs.\nShe sells 12 - 2 = <<12-2=10>>10.\n#### 10"
    assert answer_parts(answer) == [
        {"type": "text", "text": "She has 3 * 4 = "},
        {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12 eggs.\nShe sells 12 - 2 = "},
        {"type": "python", "text": "12-2"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"}]
    # split at the last "=": the expression keeps a comparison
    assert answer_parts("<<1==1=True>>")[:2] == [{"type": "python", "text": "1==1"},
                                                {"type": "python_output", "text": "True"}]


def test_gsm8k_task(env, mirror):
    env(mirror)
    task = GSM8K("main", "test")
    assert len(task) == 50 and task.eval_type == "generative"
    i = perm(50)[0]
    conversation = task[0]
    assert conversation["messages"][0] == {"role": "user", "content": f"What is {i} + 2, doubled?"}
    assert conversation["messages"][1]["content"] == answer_parts(gsm8k_rows(50)[i]["answer"])
    assert task.evaluate(conversation, f"so the answer is\n#### {2 * i + 4}") is True
    assert task.reward(conversation, f"#### {2 * i + 5}") == 0.0
    assert task.evaluate(conversation, "no idea") is False
    assert len(GSM8K("main", "test", stop=20)) == 20


def test_extract_answer_edge_cases():
    assert extract_answer("so\n#### 1,234") == "1234"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("#### 2.5 dollars") == "2.5"
    assert extract_answer("the answer is 7") is None
    assert extract_answer("#### 5\nno wait\n#### 6") == "5"  # the first match wins
    assert extract_answer("####5") is None  # the space is part of the marker


def test_humaneval_runs_programs_in_the_sandbox(env, mirror):
    env(mirror)
    task = HumanEval()
    assert len(task) == 2 and task.eval_type == "generative"
    by_entry = {task[i]["entry_point"]: task[i] for i in range(len(task))}
    add_all = by_entry["add_all"]
    row = next(r for r in HUMANEVAL_ROWS if r["entry_point"] == "add_all")
    assert add_all["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}]
    assert build_program(add_all, "def add_all(xs):\n    return 0\n") == (
        "from typing import List\n\ndef add_all(xs):\n    return 0\n\n" + row["test"] + "\ncheck(add_all)")
    for conversation in by_entry.values():  # the canonical solutions pass
        assert task.evaluate(conversation, conversation["messages"][1]["content"]) is True
    assert task.evaluate(add_all, "def add_all(xs):\n    return 0\n") is False
    # the first fenced block is the program; the shout test needs the prompt's `import math`
    fenced = "Here:\n```python\ndef shout(s):\n    return s.upper() + '!'\n```\nand ```x```"
    assert task.evaluate(by_entry["shout"], fenced) is True
    assert task.evaluate(by_entry["shout"], "```\ndef shout(s):\n    return s\n```") is False


def test_smoltalk(env, mirror):
    env(mirror)
    task = SmolTalk("test")
    rows = smoltalk_rows(4)
    for k in range(4):
        expected = [{"role": m["role"], "content": m["content"]} for m in rows[perm(4)[k]]["messages"]]
        assert task[k] == {"messages": expected}
    assert {task[k]["messages"][0]["role"] for k in range(4)} == {"system", "user"}
    with pytest.raises(PicochatError, match="no split"):
        SmolTalk("validation")


def test_spelling_bee_exact(env, mirror):
    env(mirror)
    task = SpellingBee(size=30, split="train")
    assert len(task) == 30 and task.eval_type == "generative"
    conversation = task[3]
    assert conversation == {"messages": [
        {"role": "user", "content": "Can you count the a in banana?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "We need to count the letter 'a' in the word 'banana'. First I spell the word "
                                     "out:\nbanana:b,a,n,a,n,a\n\nThen I go through it letter by letter, counting "
                                     "every 'a':\n1:b\n2:a hit, count=1\n3:n\n4:a hit, count=2\n5:n\n6:a hit, "
                                     "count=3\n\nThat makes 3.\n\nLet me double check with Python:\n\n"},
            {"type": "python", "text": "'banana'.count('a')"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": "\n\nPython also gives 3.\n\nMy final answer is:\n\n#### 3"}]}]}
    assert task.evaluate(conversation, "#### 3") and not task.evaluate(conversation, "#### 2")
    for k in range(30):  # every answer is right, and the test split draws from seed 10,000,000 + i
        word, letter = task[k]["messages"][1]["content"][1]["text"][1:-2].split("'.count('")
        assert task[k]["messages"][1]["content"][-1]["text"].endswith(f"#### {word.count(letter)}")
        assert word == random.Random(k).choice(WORDS)
    test = SpellingBee(size=5, split="test")
    assert [t["messages"][1]["content"][1]["text"].split("'")[1] for t in test] == [
        random.Random(10_000_000 + k).choice(WORDS) for k in range(5)]


def test_simple_spelling_exact(env, mirror):
    env(mirror)
    task = SimpleSpelling(size=4, split="train")
    shuffled = list(WORDS)
    random.Random(42).shuffle(shuffled)
    for k in range(4):
        word = random.Random(k).choice(shuffled)
        assert task[k] == {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                                        {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}
    assert task.evaluate(task[0], task[0]["messages"][1]["content"] + "\n")
    test = SimpleSpelling(size=2, split="test")
    assert [t["messages"][0]["content"] for t in test] == [
        f"Spell the word: {random.Random(10_000_000 + k).choice(shuffled)}" for k in range(2)]


def test_custom_json(tmp_path):
    path = tmp_path / "identity.jsonl"
    chat = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "picochat"}]
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps({"messages": [{"role": "system", "content": "s"}, *chat]})
                    + "\n")
    task = CustomJSON(path)
    assert len(task) == 2
    assert task[0] == {"messages": chat}
    assert task[1]["messages"][0] == {"role": "system", "content": "s"}
    path.write_text(json.dumps(chat) + "\n" + json.dumps(chat[::-1]) + "\n")
    with pytest.raises(PicochatError, match=r"identity.jsonl:2: message 0 has role 'assistant'"):
        CustomJSON(path)
    path.write_text("{not json\n")
    with pytest.raises(PicochatError, match="identity.jsonl:1: not valid JSON"):
        CustomJSON(path)
    with pytest.raises(PicochatError, match="no such conversations file"):
        CustomJSON(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------
# Hub datasets: order, download once, failures


def test_shuffle_is_numpy_default_rng_permutation(env, mirror):
    env(mirror)
    ds = load_hub_dataset("openai/gsm8k", "main", "test")
    rows = gsm8k_rows(50)
    assert [ds[k] for k in range(50)] == rows  # three files, concatenated in order
    shuffled = ds.shuffle(42)
    assert [shuffled[k] for k in range(50)] == [rows[j] for j in perm(50)]
    twice = shuffled.shuffle(7)
    assert [twice[k] for k in range(50)] == [rows[perm(50)[j]] for j in np.random.default_rng(7).permutation(50)]


def test_download_once_over_http_then_cache(env, server, picochat_home):
    env(server.url)
    first = GSM8K("main", "test")
    split_files = ["/openai--gsm8k/main/test/manifest.json"] + [f"/openai--gsm8k/main/test/0000{k}.parquet"
                                                                 for k in range(3)]
    assert {path: server.hits[path] for path in split_files} == dict.fromkeys(split_files, 1)
    folder = picochat_home / "task_data" / "openai--gsm8k" / "main" / "test"
    assert json.loads((folder / "manifest.json").read_text())["files"] == [f"0000{k}.parquet" for k in range(3)]
    before = sum(server.hits.values())
    second = GSM8K("main", "test")
    assert sum(server.hits.values()) == before
    assert [second[k] for k in range(50)] == [first[k] for k in range(50)]


def test_concurrent_loads_download_once(env, server):
    env(server.url)
    server.delay = 0.1  # both loaders are inside the download window at once
    results, errors = [], []

    def load():
        try:
            results.append(len(load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [7, 7]
    assert all(count == 1 for count in server.hits.values()) and len(server.hits) == 3  # manifest + 2 files


def test_half_finished_download_is_redone(env, mirror, picochat_home):
    env(mirror)
    folder = picochat_home / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    folder.mkdir(parents=True)
    (folder / "00000.parquet").write_bytes(b"left by an interrupted download")
    (folder / "00001.parquet.tmp").write_bytes(b"half")
    assert len(ARC("ARC-Easy", "test")) == 7
    assert sorted(p.name for p in folder.iterdir()) == ["00000.parquet", "00001.parquet", "listing.json",
                                                        "manifest.json"]


def test_corrupt_parquet_is_one_line_error(env, mirror, picochat_home):
    env(mirror)
    (mirror / "openai--gsm8k" / "main" / "test" / "00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(PicochatError) as excinfo:
        GSM8K("main", "test")
    assert "cannot download openai/gsm8k main/test" in one_line_error(excinfo)
    assert "failed after 2 attempts" in str(excinfo.value)
    # a cached file that went bad later names the folder to delete
    load_hub_dataset("allenai/ai2_arc", "ARC-Easy", "test")
    folder = picochat_home / "task_data" / "allenai--ai2_arc" / "ARC-Easy" / "test"
    (folder / "00000.parquet").write_bytes(b"broken")
    with pytest.raises(PicochatError) as excinfo:
        ARC("ARC-Easy", "test")
    assert f"delete {folder}" in one_line_error(excinfo)


def test_missing_split_is_one_line_error(env, server, mirror):
    for location in (mirror, server.url):
        env(location)
        with pytest.raises(PicochatError) as excinfo:
            ARC("ARC-Challenge", "test")
        assert "cannot download allenai/ai2_arc ARC-Challenge/test: not found" in one_line_error(excinfo)


def test_network_failure_is_one_line_error(env):
    env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(PicochatError) as excinfo:
        load_hub_dataset("openai/gsm8k", "main", "test")
    assert "failed after 2 attempts" in one_line_error(excinfo)
    with pytest.raises(PicochatError) as excinfo:
        SpellingBee(size=1)
    assert "cannot download the word list" in one_line_error(excinfo)


def test_bad_mirror_setting(env, tmp_path):
    env("ftp://example.com/data")
    with pytest.raises(PicochatError, match="only http"):
        load_hub_dataset("openai/gsm8k", "main", "test")
    env(tmp_path / "nowhere")
    with pytest.raises(PicochatError, match="neither an http"):
        load_hub_dataset("openai/gsm8k", "main", "test")


def test_hub_listing_endpoint(env, server, mirror, monkeypatch):
    """Without a mirror the split is listed by the Hub's parquet endpoint (here the test server),
    which answers a JSON list of file URLs."""
    monkeypatch.setattr(data, "HUB_API", f"{server.url}/api/datasets")
    listing = mirror / "api" / "datasets" / "allenai" / "ai2_arc" / "parquet" / "ARC-Easy" / "test"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([f"{server.url}/allenai--ai2_arc/ARC-Easy/test/0000{k}.parquet" for k in range(2)]))
    task = ARC("ARC-Easy", "test")
    assert [task[k]["messages"][1]["content"] for k in range(7)] == [arc_rows(7)[j]["answerKey"] for j in perm(7)]
    assert server.hits["/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"] == 1
    with pytest.raises(PicochatError) as excinfo:
        MMLU("all", "dev")
    assert "not found (HTTP 404)" in one_line_error(excinfo)


def test_word_list_downloaded_once(env, server, picochat_home):
    env(server.url)
    SpellingBee(size=1)
    SimpleSpelling(size=1)
    assert server.hits["/words_alpha.txt"] == 1
    assert (picochat_home / "task_data" / "words_alpha.txt").read_text().split() == WORDS
