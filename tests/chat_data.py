"""Small chat-task datasets in the real schemas of their Hub parquet exports, written as a task
data mirror (the layout picochat.tasks.data documents: <repo with / -> -->/<subset>/<split>/
holding NNNNN.parquet files and a manifest.json naming them, words_alpha.txt at the root)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
MMLU_FIELDS = [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
               ("answer", pa.int64())]
MMLU_SCHEMA = pa.schema(MMLU_FIELDS)
MMLU_AUX_SCHEMA = pa.schema([("train", pa.struct(MMLU_FIELDS))])  # the auxiliary_train subset nests its rows
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
HUMANEVAL_SCHEMA = pa.schema([("task_id", pa.string()), ("prompt", pa.string()), ("canonical_solution", pa.string()),
                              ("test", pa.string()), ("entry_point", pa.string())])
SMOLTALK_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])))])


def write_split(mirror: Path, repo: str, subset: str, split: str, rows: list[dict], schema: pa.Schema,
                files: int = 1) -> Path:
    """The rows as `files` parquet files (consecutive chunks) plus the manifest; returns the split folder."""
    folder = Path(mirror) / repo.replace("/", "--") / subset / split
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // files)
    names = []
    for k in range(files):
        names.append(f"{k:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[k * per_file:(k + 1) * per_file], schema=schema), folder / names[-1])
    (folder / "manifest.json").write_text(json.dumps({"files": names}))
    return folder


def write_words(mirror: Path, words: list[str]):
    # CRLF line ends, as in the real file
    (Path(mirror) / "words_alpha.txt").write_bytes("".join(w + "\r\n" for w in words).encode())


def arc_rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"Which one is number {i}?",
             "choices": {"text": [f"thing {i}", f"other {i}", f"third {i}"], "label": ["A", "B", "C"]},
             "answerKey": "ABC"[i % 3]} for i in range(n)]


def mmlu_rows(n: int, subject: str = "anatomy") -> list[dict]:
    return [{"question": f"Question {i}?", "subject": subject, "choices": [f"c{i}{j}" for j in range(4)],
             "answer": i % 4} for i in range(n)]


def gsm8k_rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} + 2, doubled?",
             "answer": f"First {i} + 2 = <<{i}+2={i + 2}>>{i + 2}.\nThen {i + 2} * 2 = <<{i + 2}*2={2 * i + 4}>>"
                       f"{2 * i + 4}.\n#### {2 * i + 4}"} for i in range(n)]


HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "entry_point": "add_all",
     "prompt": "from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n"
               "    \"\"\" Sum of the numbers.\n    >>> add_all([1, 2])\n    3\n    \"\"\"\n",
     "canonical_solution": "    return sum(xs)\n",
     "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([]) == 0\n"
             "    assert candidate([1, 2, 3]) == 6\n"},
    {"task_id": "HumanEval/1", "entry_point": "shout",
     "prompt": "import math\n\n\ndef shout(s: str) -> str:\n    \"\"\" Upper case, with '!' appended. \"\"\"\n",
     "canonical_solution": "    return s.upper() + '!'\n",
     "test": "\n\ndef check(candidate):\n    assert candidate('hi') == 'HI!'\n    assert math.pi > 3\n"},
]


def smoltalk_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"content": f"hello {i}", "role": "user"}, {"content": f"hi there {i}", "role": "assistant"}]
        if i % 2:
            messages.insert(0, {"content": "Be brief.", "role": "system"})
        rows.append({"messages": messages})
    return rows


SMOLTALK_TRAIN, MMLU_AUX, GSM8K_TRAIN, SPELLING = 60, 10, 10, 20  # rows in write_task_mirror's splits
WORDS = ["apple", "banana", "cherry", "kiwi", "strawberry", "river", "mountain"]


def write_task_mirror(root: Path) -> Path:
    """Every split chat-sft, chat-eval and chat-rl read: the SFT mixture, its validation, the five
    ChatCORE tasks and the word list."""
    write_split(root, "HuggingFaceTB/smol-smoltalk", "default", "train", smoltalk_rows(SMOLTALK_TRAIN),
                SMOLTALK_SCHEMA)
    write_split(root, "HuggingFaceTB/smol-smoltalk", "default", "test", smoltalk_rows(20), SMOLTALK_SCHEMA)
    write_split(root, "cais/mmlu", "auxiliary_train", "train", [{"train": r} for r in mmlu_rows(MMLU_AUX, "law")],
                MMLU_AUX_SCHEMA)
    write_split(root, "cais/mmlu", "all", "test", mmlu_rows(10), MMLU_SCHEMA)
    write_split(root, "openai/gsm8k", "main", "train", gsm8k_rows(GSM8K_TRAIN), GSM8K_SCHEMA)
    write_split(root, "openai/gsm8k", "main", "test", gsm8k_rows(10), GSM8K_SCHEMA)
    write_split(root, "allenai/ai2_arc", "ARC-Easy", "test", arc_rows(6), ARC_SCHEMA)
    write_split(root, "allenai/ai2_arc", "ARC-Challenge", "test", arc_rows(6), ARC_SCHEMA)
    write_split(root, "openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, HUMANEVAL_SCHEMA)
    write_words(root, WORDS)
    return root
