"""Convert the local copies of the chat task data in ../shared/data/chat into a task data mirror.

For optional local checks only: picochat never needs ../shared. With the output folder as
PICOCHAT_TASK_DATA_URL, the real task code (picochat.tasks) loads the real ARC, MMLU, GSM8K and
HumanEval rows from it, in the layout and parquet schemas of the Hub exports (see
picochat/tasks/data.py):

    python bench/shared_task_mirror.py --shared ../shared/data/chat --out /tmp/task_mirror
    PICOCHAT_TASK_DATA_URL=/tmp/task_mirror picochat chat-eval ...

Two datasets are not in ../shared and are STAND-INS here:
  - MMLU auxiliary_train (~100K questions): replaced by the 285 MMLU dev questions (cais/mmlu
    auxiliary_train/train, rows nested under "train" as in the Hub export). The dev split is
    disjoint from the test split that chat-eval scores.
  - SmolTalk (HuggingFaceTB/smol-smoltalk): replaced by plain chat conversations from a
    deterministic template (greetings, arithmetic and word questions), built from no eval data.
"""

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
MMLU_FIELDS = [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
               ("answer", pa.int64())]
MMLU_AUX_SCHEMA = pa.schema([("train", pa.struct(MMLU_FIELDS))])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
HUMANEVAL_SCHEMA = pa.schema([("task_id", pa.string()), ("prompt", pa.string()), ("canonical_solution", pa.string()),
                              ("test", pa.string()), ("entry_point", pa.string())])
SMOLTALK_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())])))])


def write_split(out: Path, repo: str, subset: str, split: str, rows: list[dict], schema: pa.Schema):
    folder = out / repo.replace("/", "--") / subset / split
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({"files": ["00000.parquet"]}) + "\n")
    print(f"{repo} {subset}/{split}: {len(rows)} rows")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_mmlu(folder: Path, suffix: str) -> list[dict]:
    """hendrycks/test CSVs (header question,choice0..3,answer with answer 0-3), subject from the file name."""
    rows = []
    for path in sorted(folder.glob(f"*_{suffix}.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows.append({"question": r["question"], "subject": path.name.removesuffix(f"_{suffix}.csv"),
                             "choices": [r[f"choice{j}"] for j in range(4)], "answer": int(r["answer"])})
    return rows


def smoltalk_standin(n: int, seed: int) -> list[dict]:
    """Plain template conversations (a stand-in for SmolTalk; no eval data)."""
    rng = random.Random(seed)
    words = ["apple", "river", "garden", "window", "music", "planet", "yellow", "forest", "candle", "bridge"]
    rows = []
    for _ in range(n):
        kind = rng.randrange(4)
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        word = rng.choice(words)
        if kind == 0:
            user, assistant = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            user, assistant = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
        elif kind == 2:
            user, assistant = f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."
        else:
            user, assistant = rng.choice(["Hello!", "Hi there.", "Good morning!"]), "Hello! How can I help you today?"
        messages = [{"content": user, "role": "user"}, {"content": assistant, "role": "assistant"}]
        if rng.random() < 0.2:
            messages.insert(0, {"content": "You are a helpful assistant.", "role": "system"})
        rows.append({"messages": messages})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default="../shared/data/chat", help="the chat/ folder of shared/data")
    parser.add_argument("--out", required=True, help="the mirror folder to write")
    args = parser.parse_args()
    src, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "validation", "test"):
            write_split(out, "allenai/ai2_arc", subset, split, read_jsonl(src / "arc" / subset / f"{split}.jsonl"),
                        ARC_SCHEMA)
    mmlu = pa.schema(MMLU_FIELDS)
    write_split(out, "cais/mmlu", "all", "test", read_mmlu(src / "mmlu" / "test", "test"), mmlu)
    dev = read_mmlu(src / "mmlu" / "dev", "dev")
    write_split(out, "cais/mmlu", "all", "dev", dev, mmlu)
    write_split(out, "cais/mmlu", "auxiliary_train", "train", [{"train": r} for r in dev], MMLU_AUX_SCHEMA)  # stand-in
    for split in ("train", "test"):
        rows = [{k: r[k] for k in GSM8K_SCHEMA.names} for r in read_jsonl(src / "gsm8k" / f"{split}.jsonl")]
        write_split(out, "openai/gsm8k", "main", split, rows, GSM8K_SCHEMA)
    rows = [{k: r[k] for k in HUMANEVAL_SCHEMA.names} for r in read_jsonl(src / "humaneval" / "HumanEval.jsonl")]
    write_split(out, "openai/openai_humaneval", "openai_humaneval", "test", rows, HUMANEVAL_SCHEMA)
    for split, n, seed in (("train", 2000, 0), ("test", 200, 1)):
        write_split(out, "HuggingFaceTB/smol-smoltalk", "default", split, smoltalk_standin(n, seed), SMOLTALK_SCHEMA)
    shutil.copyfile(src / "spellingbee" / "words_alpha.txt", out / "words_alpha.txt")
    print(f"wrote the mirror to {out}")


if __name__ == "__main__":
    main()
