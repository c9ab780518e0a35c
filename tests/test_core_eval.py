"""CORE evaluation against independent truths: hand-written prompts, an oracle model
that must score 1, a uniform model whose ties we resolve by hand, and the bundle's
ways in (folder, zip, URL)."""

import dataclasses
import http.server
import json
import shutil
import threading
import zipfile

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import free_port

from picochat import core_eval
from picochat.common import PicochatError

N = 11  # examples per task: the fewest that 10-shot prompts allow


@pytest.fixture
def bundle(monkeypatch, core_bundle, tmp_path):
    """The generated bundle (all 22 tasks, real format) less squad: 21 of 22 tasks, like the bundle
    under ../shared."""
    folder = shutil.copytree(core_bundle, tmp_path / "bundle")
    (folder / "eval_data" / "reading_comprehension" / "squad.jsonl").unlink()
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(folder))
    return folder


@pytest.fixture
def tasks(bundle):
    return {t.label: t for t in core_eval.load_tasks(bundle)}


def present(tasks):
    return [t for t in tasks.values() if t.path.exists()]


# Five hand-written items per task, in file order. Loading shuffles them with Random(1337) to
# [1, 0, 3, 2, 4], and the two shots of example 0 are Random(1234).sample([1, 2, 3, 4], 2) == [4, 1]
# of that list: item 1 of the file is asked, items 4 and 0 are its shots.
def filler_mc(i):
    return {"query": f"Question: filler {i}?", "choices": ["a", "b"], "gold": 0}


HAND = {
    "arc_easy": [
        {"query": "Question: Which food contains the highest percentage of protein?",
         "choices": ["bread", "chicken", "apple", "rice"], "gold": 1},
        {"query": "Question: Charles Darwin made a number of observations and inferences during his travels. He "
                  "studied island finches during a long period of time. Which statement is an inference?",
         "choices": ["Individual birds have different colored feathers.",
                     "Island finches have a large number of offspring.",
                     "Individual birds of an island finch species have many differences.",
                     "Island finches share a common ancestry with mainland finch species."], "gold": 3},
        filler_mc(2), filler_mc(3),
        {"query": "Question: Which would help conserve water?",
         "choices": ["Turn off water while brushing teeth", "Take longer showers"], "gold": 0},
    ],
    "copa": [
        filler_mc(0),
        {"query": "Political violence broke out in the nation, therefore many citizens",
         "choices": ["relocated to the capitol.", "took refuge in other territories."], "gold": 1},
        filler_mc(2), filler_mc(3), filler_mc(4),
    ],
    "winograd": [
        {"context_options": ["My meeting started at 4:00 and I needed to catch the train at 4:30, so there wasn't "
                             "much time. Luckily, the meeting", "My meeting started at 4:00 and I needed to catch "
                             "the train at 4:30, so there wasn't much time. Luckily, the train"],
         "continuation": "was delayed, so it worked out.", "gold": 1},
        {"context_options": ["In the storm, the tree fell down and crashed through the roof of my house. Now, I "
                             "have to get the tree", "In the storm, the tree fell down and crashed through the "
                             "roof of my house. Now, I have to get the roof"],
         "continuation": "repaired.", "gold": 1},
        {"context_options": ["a", "b"], "continuation": "filler 2.", "gold": 0},
        {"context_options": ["a", "b"], "continuation": "filler 3.", "gold": 0},
        {"context_options": ["The sun was covered by a thick cloud all morning, but luckily, by the time the "
                             "picnic started, the sun", "The sun was covered by a thick cloud all morning, but "
                             "luckily, by the time the picnic started, the cloud"],
         "continuation": "was gone.", "gold": 1},
    ],
    "jeopardy": [
        {"context": "SCIENCE: Vauquelin found Beryllium in 1798, the year after he found this, symbol Cr",
         "continuation": "Chromium", "category": "science"},
        {"context": "AMERICAN HISTORY: On Dec. 16, 1773 American patriots dumped 342 chests of tea into this "
                    "citys harbor", "continuation": "Boston", "category": "history"},
        {"context": "filler 2", "continuation": "two", "category": "x"},
        {"context": "filler 3", "continuation": "three", "category": "x"},
        {"context": "SCIENCE: This is the permanent removal of unwanted hair by destroying its roots with electric "
                    "current", "continuation": "electrolysis", "category": "science"},
    ],
}


@pytest.fixture
def hand_tasks(tasks, tmp_path):
    """The bundle's task definitions with the HAND items as their data."""
    out = {}
    for label, items in HAND.items():
        path = tmp_path / "hand" / f"{label}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
        out[label] = dataclasses.replace(tasks[label], path=path)
    return out


# ---------------------------------------------------------------------------
# Bundle contents


def test_tasks_from_core_yaml(tasks):
    assert len(tasks) == 22
    arc, copa, jeopardy, winograd = tasks["arc_easy"], tasks["copa"], tasks["jeopardy"], tasks["winograd"]
    assert (arc.task_type, arc.num_fewshot, arc.delimiter, arc.baseline) == ("multiple_choice", 10, "\nAnswer: ", 25)
    assert (copa.num_fewshot, copa.delimiter, copa.baseline) == (0, " ", 50)
    assert (jeopardy.task_type, jeopardy.num_fewshot, jeopardy.delimiter) == ("language_modeling", 10, "\nAnswer: ")
    assert (winograd.task_type, winograd.num_fewshot) == ("schema", 0)
    assert tasks["bigbench_language_identification"].baseline == 9.1
    assert tasks["agi_eval_lsat_ar"].num_fewshot == 3


def test_centered():
    assert core_eval.centered(0.25, 25) == 0.0
    assert core_eval.centered(0.62, 62) == pytest.approx(0.0, abs=1e-12)
    assert core_eval.centered(1.0, 50) == 1.0
    assert core_eval.centered(0.5, 25) == pytest.approx(1 / 3)
    assert core_eval.centered(0.0, 50) == -1.0


# ---------------------------------------------------------------------------
# Prompts: shuffled with seed 1337, truncated, few-shot drawn with Random(1234 + idx) (see HAND).


def two_shot(task):
    return dataclasses.replace(task, num_fewshot=2)


def test_render_multiple_choice(hand_tasks):
    task = two_shot(hand_tasks["arc_easy"])
    data = core_eval.load_examples(task, 5)
    prompts = core_eval.render_prompts(task.task_type, data[0], task.delimiter,
                                       core_eval.fewshot_examples(data, 0, 2))
    shots = ("Question: Which would help conserve water?\nAnswer: Turn off water while brushing teeth\n\n"
             "Question: Which food contains the highest percentage of protein?\nAnswer: chicken\n\n")
    query = ("Question: Charles Darwin made a number of observations and inferences during his travels. He studied "
             "island finches during a long period of time. Which statement is an inference?\nAnswer: ")
    assert prompts == [
        shots + query + "Individual birds have different colored feathers.",
        shots + query + "Island finches have a large number of offspring.",
        shots + query + "Individual birds of an island finch species have many differences.",
        shots + query + "Island finches share a common ancestry with mainland finch species.",
    ]


def test_render_zero_shot_multiple_choice(hand_tasks):
    task = hand_tasks["copa"]
    data = core_eval.load_examples(task, 5)
    assert core_eval.render_prompts(task.task_type, data[0], task.delimiter, []) == [
        "Political violence broke out in the nation, therefore many citizens relocated to the capitol.",
        "Political violence broke out in the nation, therefore many citizens took refuge in other territories.",
    ]


def test_render_schema(hand_tasks):
    task = two_shot(hand_tasks["winograd"])
    data = core_eval.load_examples(task, 5)
    prompts = core_eval.render_prompts(task.task_type, data[0], task.delimiter,
                                       core_eval.fewshot_examples(data, 0, 2))
    shots = ("The sun was covered by a thick cloud all morning, but luckily, by the time the picnic started, "
             "the cloud was gone.\n\n"
             "My meeting started at 4:00 and I needed to catch the train at 4:30, so there wasn't much time. "
             "Luckily, the train was delayed, so it worked out.\n\n")
    context = "In the storm, the tree fell down and crashed through the roof of my house. Now, I have to get the "
    assert prompts == [shots + context + "tree repaired.", shots + context + "roof repaired."]


def test_render_language_modeling(hand_tasks):
    task = two_shot(hand_tasks["jeopardy"])
    data = core_eval.load_examples(task, 5)
    without, with_ = core_eval.render_prompts(task.task_type, data[0], task.delimiter,
                                              core_eval.fewshot_examples(data, 0, 2))
    shots = ("SCIENCE: This is the permanent removal of unwanted hair by destroying its roots with electric current"
             "\nAnswer: electrolysis\n\n"
             "SCIENCE: Vauquelin found Beryllium in 1798, the year after he found this, symbol Cr"
             "\nAnswer: Chromium\n\n")
    context = "AMERICAN HISTORY: On Dec. 16, 1773 American patriots dumped 342 chests of tea into this citys harbor"
    assert without == shots + context + "\nAnswer:"  # the delimiter's trailing space is stripped ...
    assert with_ == shots + context + "\nAnswer: Boston"  # ... but kept before the continuation


def test_render_language_modeling_trims_contexts():
    shot = {"context": " Q: 1+1?\nAnswer: ", "continuation": "2"}
    item = {"context": "Q: 2+2?\nAnswer:  ", "continuation": "4"}
    assert core_eval.render_prompts("language_modeling", item, " ", [shot]) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer:", "Q: 1+1?\nAnswer: 2\n\nQ: 2+2?\nAnswer: 4"]


def test_fewshot_pool_is_the_truncated_list(hand_tasks):
    data = core_eval.load_examples(hand_tasks["copa"], 5)
    shots = core_eval.fewshot_examples(data, 1, 2)
    assert shots == [data[4], data[3]]  # Random(1235).sample([0, 2, 3, 4], 2)
    with pytest.raises(PicochatError, match="at least 11 examples"):
        core_eval.fewshot_examples(data, 0, 10)


def test_spans(hand_tasks, small_tokenizer):
    tok = small_tokenizer
    bos = tok.get_bos_token_id()
    for label, item_idx, expected in [
        ("copa", 0, [" relocated to the capitol.", " took refuge in other territories."]),
        ("winograd", 0, [" repaired.", " repaired."]),
    ]:
        task = hand_tasks[label]
        data = core_eval.load_examples(task, 5)
        [ex] = core_eval.prepare_examples(tok, task, data, [item_idx])
        assert all(row[0] == bos for row in ex.rows)
        assert [tok.decode(row[s:e]) for row, s, e in zip(ex.rows, ex.starts, ex.ends)] == expected
        assert ex.gold == data[item_idx]["gold"]
    task = two_shot(hand_tasks["jeopardy"])
    data = core_eval.load_examples(task, 5)
    [ex] = core_eval.prepare_examples(tok, task, data, [0])
    assert len(ex.rows) == 1 and tok.decode(ex.rows[0][ex.starts[0]:ex.ends[0]]) == " Boston"


def test_common_prefix_suffix():
    assert core_eval.common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1
    assert core_eval.common_prefix_len([[1, 2], [1, 2, 3]]) == 2
    assert core_eval.common_suffix_len([[9, 1, 2], [8, 1, 2], [1, 2]]) == 2


# ---------------------------------------------------------------------------
# Scoring against independent truths


class OracleModel:
    """Logits that put (numerically) all probability on the next token of whichever gold
    sequence the input so far is a prefix of, uniform where it matches none. Under a packing,
    "the input so far" is the token's own sequence, followed back through packing.prev."""

    NEXT = -1

    def __init__(self, gold_rows, vocab_size):
        self.vocab_size = vocab_size
        self.root = {}
        for row in gold_rows:
            node = self.root
            for t, token in enumerate(row):
                node = node.setdefault(token, {})
                if t + 1 < len(row):
                    node.setdefault(self.NEXT, row[t + 1])

    def __call__(self, ids, packing=None):
        B, T = ids.shape
        positions = packing.positions.tolist() if packing else [list(range(T))] * B
        prev = packing.prev.tolist() if packing else [[t - 1 for t in range(T)]] * B
        hits = []  # (row, index, predicted token)
        for b, row in enumerate(ids.tolist()):
            nodes = []  # the trie node each token's sequence has reached (None: left the trie)
            for t, token in enumerate(row):
                parent = self.root if positions[b][t] == 0 else nodes[prev[b][t]]
                nodes.append(parent.get(token) if parent is not None else None)
                if nodes[t] is not None and self.NEXT in nodes[t]:
                    hits.append((b, t, nodes[t][self.NEXT]))
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[tuple(torch.tensor(hits).T)] = 30.0
        return logits


def test_oracle_scores_one_on_every_task(tasks, small_tokenizer):
    tok = small_tokenizer
    for task in present(tasks):
        data = core_eval.load_examples(task, N)
        examples = core_eval.prepare_examples(tok, task, data, range(len(data)))
        oracle = OracleModel([ex.rows[ex.gold] for ex in examples], tok.get_vocab_size())
        for share_prefix in (False, True):  # the oracle follows each token's own sequence when packed
            scores = core_eval.score_examples(oracle, examples, tok.get_bos_token_id(), "cpu", 3000,
                                              share_prefix=share_prefix)
            correct = [core_eval.is_correct(task.task_type, ex, m, e) for ex, (m, e) in zip(examples, scores)]
            assert correct == [True] * N, (task.label, share_prefix)
        correct = core_eval.evaluate_task(oracle, tok, task, "cpu", max_per_task=N, batch_tokens=3000)
        assert correct.tolist() == [1.0] * N, task.label


def test_uniform_model_picks_the_first_option(tasks, small_tokenizer):
    tok = small_tokenizer
    V = tok.get_vocab_size()
    calls = []

    def uniform(ids, packing=None):
        calls.append(ids.shape)
        return torch.zeros(*ids.shape, V)

    labels = [t.label for t in present(tasks)]
    result = core_eval.evaluate_core(uniform, tok, "cpu", max_per_task=N, tasks=labels, batch_tokens=4000)
    assert calls
    for task in present(tasks):
        data = core_eval.load_examples(task, N)
        # MC and schema: every option has the same mean loss (ln V), so the first one wins;
        # LM: argmax of uniform logits is token 0 (a NUL byte), which no continuation contains
        expected = 0.0 if task.task_type == "language_modeling" else sum(d["gold"] == 0 for d in data) / N
        assert result["tasks"][task.label]["accuracy"] == expected, task.label
        assert result["tasks"][task.label]["examples"] == N
    assert result["metric_name"] == "CORE (partial: 21/22 tasks, at most 11 examples per task)"
    assert result["core"] is None and (result["num_tasks"], result["total_tasks"]) == (21, 22)
    expected_metric = sum(core_eval.centered(r["accuracy"], r["baseline"]) for r in result["tasks"].values()) / 21
    assert result["metric"] == pytest.approx(expected_metric)
    assert result["examples"] == 21 * N and result["examples_per_s"] > 0
    table = core_eval.format_table(result)
    assert table.splitlines()[-1].startswith(result["metric_name"]) and "copa" in table


def test_mean_loss_over_span_and_exact_match():
    # vocab 3; the model always predicts p = (1/2, 1/4, 1/4): loss ln2 for token 0, ln4 otherwise
    logp = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    model = lambda ids, packing=None: logp.expand(*ids.shape, 3).clone()
    rows = [[2, 0, 0, 1], [2, 1, 1], [2, 0, 1, 0, 0]]
    starts, ends = [1, 2, 3], [4, 3, 5]
    ln2 = torch.log(torch.tensor(2.0)).item()
    for packed in (False, True):
        examples = [core_eval.Example([r], [s], [e], 0) for r, s, e in zip(rows, starts, ends)]
        means, exact = core_eval.score_batch(model, examples, pad_id=2, device="cpu", packed=packed)
        assert means == pytest.approx([(ln2 + ln2 + 2 * ln2) / 3, 2 * ln2, ln2])
        assert exact == [False, False, True]  # argmax is always token 0


def test_pack_layout():
    # three options sharing [1, 5, 6]; the third is the shared part plus nothing but one token
    example = core_eval.Example([[1, 5, 6, 7, 8], [1, 5, 6, 9], [1, 5, 6, 3]], [3, 3, 3], [5, 4, 4], 0)
    tokens, positions, segments, prev, where = core_eval.pack(example)
    assert tokens == [1, 5, 6, 7, 8, 9, 3]
    assert positions == [0, 1, 2, 3, 4, 3, 3]
    assert segments == [0, 0, 0, 1, 1, 2, 3]
    assert prev == [0, 0, 1, 2, 3, 2, 2]
    assert where == [[0, 1, 2, 3, 4], [0, 1, 2, 5], [0, 1, 2, 6]]
    assert core_eval.packed_len(example) == 7
    # one row packs to itself
    one_row = core_eval.Example([[1, 2, 3]], [1], [3], 0)
    assert core_eval.pack(one_row)[:4] == ([1, 2, 3], [0, 1, 2], [0, 0, 0], [0, 0, 1])
    # 13 plain tokens vs 7 packed: pays; two options sharing only BOS do not
    assert core_eval.should_pack([example])
    assert not core_eval.should_pack([core_eval.Example([[1, 2, 3], [1, 4, 5]], [1, 1], [3, 3], 0)])


def test_length_batches():
    rows = [[10, 12], [5], [8, 8, 9], [3, 4]]  # row lengths of four examples
    examples = [core_eval.Example([[0] * n for n in r], [1] * len(r), r, 0) for r in rows]
    batches = lambda budget: [list(b) for b in core_eval.length_batches(examples, budget)]
    # longest first: ex0 (T 12, 2 rows), ex2 (T 9, 3 rows), ex1 (1 row), ex3 (2 rows)
    assert batches(50) == [[0], [2, 1], [3]]  # 5x12 > 50; 4x9 <= 50 < 6x9
    assert batches(1) == [[0], [2], [1], [3]]  # one example per forward, as the reference
    assert batches(10_000) == [[0, 2, 1, 3]]
    # packed, each example is one sequence as long as its rows laid end to end (no shared prefix
    # here: all-zero rows of different lengths share min(length) tokens): 12, 5, 9, 4
    packed = lambda budget: [list(b) for b in core_eval.length_batches(examples, budget, packed=True)]
    assert [core_eval.packed_len(ex) for ex in examples] == [12, 5, 9, 4]
    assert packed(24) == [[0, 2], [1, 3]]  # 2x12 <= 24 < 3x12; then 5x2
    assert packed(1) == [[0], [2], [1], [3]]


def test_empty_task_list_and_unknown_task(bundle):
    with pytest.raises(PicochatError, match="unknown CORE task.*nope.*choose from.*copa"):
        core_eval.evaluate_core(None, None, "cpu", tasks=["copa", "nope"])
    with pytest.raises(PicochatError, match="no CORE tasks"):
        core_eval.evaluate_core(None, None, "cpu", tasks=[])


def test_full_run_stops_early_on_missing_squad(bundle):
    def model(ids):
        raise AssertionError("nothing may be evaluated before the bundle is checked")

    with pytest.raises(PicochatError, match=r"reading_comprehension/squad\.jsonl.*task squad.*--tasks"):
        core_eval.evaluate_core(model, None, "cpu", max_per_task=N)


# ---------------------------------------------------------------------------
# The bundle's ways in, and full vs partial CORE on a bundle whose core.yaml lists two tasks


def make_bundle(src, dst):
    config = yaml.safe_load((src / "core.yaml").read_text())
    config["icl_tasks"] = [t for t in config["icl_tasks"] if t["label"] in ("copa", "winograd")]
    dst.mkdir(parents=True)
    (dst / "core.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(src / "eval_meta_data.csv", dst)
    for t in config["icl_tasks"]:
        (dst / "eval_data" / t["dataset_uri"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "eval_data" / t["dataset_uri"], dst / "eval_data" / t["dataset_uri"])
    return dst


def make_zip(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, "eval_bundle/" + p.relative_to(folder).as_posix())
    return path


def bigram_model(vocab_size, seed=0):
    table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))
    return lambda ids, packing=None: table[ids]  # depends on the current token only


def test_full_and_partial_core(tmp_path, monkeypatch, small_tokenizer, core_bundle):
    folder = make_bundle(core_bundle, tmp_path / "two")
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(folder))
    model = bigram_model(small_tokenizer.get_vocab_size())
    full = core_eval.evaluate_core(model, small_tokenizer, "cpu")
    assert full["metric_name"] == "CORE" and full["core"] == full["metric"]
    copa, winograd = full["tasks"]["copa"], full["tasks"]["winograd"]
    assert list(full["tasks"]) == ["copa", "winograd"]
    assert full["metric"] == pytest.approx((copa["centered"] + winograd["centered"]) / 2)
    part = core_eval.evaluate_core(model, small_tokenizer, "cpu", tasks=["winograd"])
    assert part["metric_name"] == "CORE (partial: 1/2 tasks)" and part["core"] is None
    assert part["tasks"]["winograd"]["accuracy"] == full["tasks"]["winograd"]["accuracy"]


def test_bundle_from_zip(tmp_path, monkeypatch, picochat_home, small_tokenizer, core_bundle):
    folder = make_bundle(core_bundle, tmp_path / "two")
    model = bigram_model(small_tokenizer.get_vocab_size())
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(folder))
    from_folder = core_eval.evaluate_core(model, small_tokenizer, "cpu")
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(make_zip(folder, tmp_path / "bundle.zip")))
    assert core_eval.load_bundle() == picochat_home / "eval_bundle"
    assert (picochat_home / "eval_bundle" / "eval_data" / "commonsense_reasoning" / "copa.jsonl").is_file()
    from_zip = core_eval.evaluate_core(model, small_tokenizer, "cpu")
    assert {k: v["accuracy"] for k, v in from_zip["tasks"].items()} == {
        k: v["accuracy"] for k, v in from_folder["tasks"].items()}
    assert from_zip["metric_name"] == "CORE"


def test_bundle_download_happens_once(tmp_path, monkeypatch, picochat_home, core_bundle):
    payload = make_zip(make_bundle(core_bundle, tmp_path / "two"), tmp_path / "b.zip").read_bytes()
    requests_seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests_seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", f"http://127.0.0.1:{server.server_port}/eval_bundle.zip")
        found = []
        threads = [threading.Thread(target=lambda: found.append(core_eval.load_bundle())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert found == [picochat_home / "eval_bundle"] * 3
        assert core_eval.load_bundle() == picochat_home / "eval_bundle"
        assert requests_seen == ["/eval_bundle.zip"]
        assert [t.label for t in core_eval.load_tasks(found[0])] == ["copa", "winograd"]
        assert not list(picochat_home.glob("*.zip*")) and not list(picochat_home.glob("*.tmp"))
    finally:
        server.shutdown()
        server.server_close()


def test_bad_bundles(tmp_path, monkeypatch, picochat_home):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(bad))
    with pytest.raises(PicochatError, match="could not unpack"):
        core_eval.load_bundle()
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(tmp_path / "nowhere"))
    with pytest.raises(PicochatError, match="neither a folder nor a zip"):
        core_eval.load_bundle()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(tmp_path / "empty"))
    with pytest.raises(PicochatError, match="no core.yaml"):
        core_eval.load_bundle()


# ---------------------------------------------------------------------------
# Ranks: example r, r+W, ... on rank r; the correctness vectors are summed


def _rank_worker(rank, port, tokenizer, task, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = bigram_model(tokenizer.get_vocab_size())
        correct = core_eval.evaluate_task(model, tokenizer, task, "cpu", max_per_task=15, batch_tokens=4000)
        results[rank] = correct.tolist()
    finally:
        dist.destroy_process_group()


def test_ranks_split_the_examples(tasks, small_tokenizer):
    import torch.multiprocessing as mp

    task = tasks["arc_easy"]
    single = core_eval.evaluate_task(bigram_model(small_tokenizer.get_vocab_size()), small_tokenizer, task, "cpu",
                                     max_per_task=15, batch_tokens=4000).tolist()
    assert 0 < sum(single) < 15  # a real mix, so a wrong split would show
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(port, small_tokenizer, task, results), nprocs=2)
        assert results[0] == results[1] == single


# ---------------------------------------------------------------------------
# Batching changes no score: a real (random) GPT, several examples per forward vs one


def random_gpt(vocab_size, seq_len=256):
    from picochat.gpt import build_model, config_from_depth

    torch.manual_seed(0)
    config = config_from_depth(2, vocab_size, max_seq_len=seq_len, aspect_ratio=32, head_dim=32)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():  # the default init has zero block outputs: make attention and MLPs matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.smear_lambda.fill_(0.5)  # smear starts off; a packing must feed it the right previous token
    return model.eval()


def test_batched_and_packed_equal_one_at_a_time(tasks, small_tokenizer):
    """The reference's way (one example per forward, every option a full sequence) against
    batching and against batching with shared prefixes. arc_easy's 10-shot prompts run past the
    model's 128-token short window, so windows under a packing are covered too."""
    tok = small_tokenizer
    model = random_gpt(tok.get_vocab_size())
    assert model.window_sizes[0] == 128
    decided = 0
    for label in ["hellaswag_zeroshot", "copa", "arc_easy", "winograd", "bigbench_qa_wikidata", "lambada_openai"]:
        task = tasks[label]
        data = core_eval.load_examples(task, N)
        examples = core_eval.prepare_examples(tok, task, data, range(N))
        single = core_eval.score_examples(model, examples, tok.get_bos_token_id(), "cpu", 1, share_prefix=False)
        for share in (False, True):
            batched = core_eval.score_examples(model, examples, tok.get_bos_token_id(), "cpu", 2000,
                                               share_prefix=share)
            for ex, (m1, e1), (m2, e2) in zip(examples, single, batched):
                assert m2 == pytest.approx(m1, rel=1e-5) and e2 == e1, (label, share)
                assert core_eval.is_correct(task.task_type, ex, m2, e2) == core_eval.is_correct(task.task_type, ex, m1,
                                                                                               e1)
        decided += sum(len(set(m)) > 1 for m, _ in single)
        if label == "arc_easy":
            assert max(len(row) for ex in examples for row in ex.rows) > 2 * 128
    assert decided >= 30  # the options' losses really differ, so the comparison means something


# ---------------------------------------------------------------------------
# A model shorter than the prompts: rows are cropped to their last tokens, as in the reference


def test_crop_keeps_the_last_tokens_and_shifts_spans():
    example = core_eval.Example(rows=[[1, 2, 3, 4, 5, 6], [1, 2, 3]], starts=[4, 1], ends=[6, 3], gold=0)
    cropped = core_eval.crop(example, 4)
    assert (cropped.rows, cropped.starts, cropped.ends) == ([[3, 4, 5, 6], [1, 2, 3]], [2, 1], [4, 3])
    # a span reaching into the cut keeps one token before it to be predicted from
    cropped = core_eval.crop(core_eval.Example([[1, 2, 3, 4, 5]], [2], [5], 0), 3)
    assert (cropped.rows, cropped.starts, cropped.ends) == ([[3, 4, 5]], [1], [3])


def test_a_short_context_model_runs_every_task(core_bundle, monkeypatch, small_tokenizer):
    """A model with T=8 (rotary table 80) on the full 22-task CORE, whose long tasks have prompts
    of hundreds of tokens; a cropped row scores as a plain forward over its last 80 tokens."""
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE", str(core_bundle))
    tok = small_tokenizer
    model = random_gpt(tok.get_vocab_size(), seq_len=8)
    assert model.rotary_len == 80
    result = core_eval.evaluate_core(model, tok, "cpu")
    assert result["metric_name"] == "CORE" and len(result["tasks"]) == 22
    assert all(r["examples"] == 12 for r in result["tasks"].values())

    task = {t.label: t for t in core_eval.load_tasks(core_bundle)}["hellaswag"]
    data = core_eval.load_examples(task)
    [full] = core_eval.prepare_examples(tok, task, data, [0])
    assert min(len(row) for row in full.rows) > 80
    [cropped] = core_eval.prepare_examples(tok, task, data, [0], max_len=80)
    [(means, _)] = core_eval.score_examples(model, [cropped], tok.get_bos_token_id(), "cpu")
    with torch.no_grad():
        for row, start, end, mean in zip(full.rows, full.starts, full.ends, means):
            cut = len(row) - 80
            ids = torch.tensor([row[cut:]])
            logits = model(ids)[0]
            by_hand = F.cross_entropy(logits[start - cut - 1:end - cut - 1], ids[0, start - cut:end - cut])
            assert mean == pytest.approx(by_hand.item(), rel=1e-5)
