"""GSM8K (openai/gsm8k): grade-school math word problems whose worked answers mark each
calculation as <<expression=result>> and end with "#### <number>". Subsets main and socratic;
train 7473, test 1319 problems.

The assistant's answer becomes parts: the text between tags, and per tag a python call (the
expression) and its output (the result), so the model learns to hand arithmetic to the tool."""

import re

from picochat.common import PicochatError
from picochat.tasks.common import SHUFFLE_SEED, Task, load_hub_dataset

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
TOOL_TAG_RE = re.compile(r"<<(.*?)>>")


def extract_answer(text: str) -> str | None:
    """The number after the first "#### ", without its thousands commas; None if there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None


def answer_parts(answer: str) -> list[dict]:
    parts = []
    pieces = TOOL_TAG_RE.split(answer)  # text, tag, text, tag, ..., text
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        # the result follows the last "=", as an expression may compare with "==" or ">="
        expression, result = piece.rsplit("=", 1) if "=" in piece else (piece, "")
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
    return parts


def final_answer_matches(conversation: dict, completion: str) -> bool:
    """Whether the completion's "#### N" is the reference's, which ends its last text part."""
    texts = [p["text"] for p in conversation["messages"][-1]["content"] if p["type"] == "text"]
    reference = extract_answer(texts[-1]) if texts else None
    return reference is not None and extract_answer(completion) == reference


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "test", **slice_args):
        super().__init__(**slice_args)
        if subset not in SUBSETS or split not in SPLITS:
            raise PicochatError(f"GSM8K subset {subset!r} split {split!r}: choose a subset of "
                                f"{', '.join(SUBSETS)} and a split of {', '.join(SPLITS)}")
        self.ds = load_hub_dataset("openai/gsm8k", subset, split).shuffle(SHUFFLE_SEED)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": answer_parts(row["answer"])}]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return final_answer_matches(conversation, completion)
