"""MMLU (cais/mmlu): four-choice questions over 57 subjects, as a multiple-choice task.

Subset "all" has the splits auxiliary_train (~100K questions from other exams, for training),
validation, dev (5 per subject) and test (~14K). Subset "auxiliary_train" has the same training
questions as its one split "train"; the Hub's export of it nests every row under a "train"
column, which get_example unwraps."""

from picochat.common import PicochatError
from picochat.tasks.common import SHUFFLE_SEED, MultipleChoiceTask, load_hub_dataset, render_mc

SPLITS = {"all": ("auxiliary_train", "validation", "dev", "test"), "auxiliary_train": ("train",)}
LETTERS = ["A", "B", "C", "D"]


class MMLU(MultipleChoiceTask):
    def __init__(self, subset: str = "all", split: str = "test", **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS.get(subset, ()):
            choices = "; ".join(f"subset {s!r}: {', '.join(splits)}" for s, splits in SPLITS.items())
            raise PicochatError(f"MMLU subset {subset!r} has no split {split!r} ({choices})")
        self.ds = load_hub_dataset("cais/mmlu", subset, split).shuffle(SHUFFLE_SEED)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        row = row.get("train", row)
        if len(row["choices"]) != len(LETTERS) or row["answer"] not in range(len(LETTERS)):
            raise PicochatError(f"MMLU row {index}: expected 4 choices and an answer 0-3, got "
                                f"{len(row['choices'])} choices and answer {row['answer']!r}")
        messages = [{"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                    {"role": "assistant", "content": LETTERS[row["answer"]]}]
        return {"messages": messages, "subject": row["subject"], "letters": LETTERS}
