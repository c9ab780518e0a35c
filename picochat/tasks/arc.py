"""ARC (allenai/ai2_arc): grade-school science questions with 3-5 labelled choices, as a
multiple-choice task. Test sets: ARC-Easy 2376, ARC-Challenge 1172 questions."""

from picochat.common import PicochatError
from picochat.tasks.common import SHUFFLE_SEED, MultipleChoiceTask, load_hub_dataset, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **slice_args):
        super().__init__(**slice_args)
        if subset not in SUBSETS or split not in SPLITS:
            raise PicochatError(f"ARC subset {subset!r} split {split!r}: choose a subset of {', '.join(SUBSETS)} "
                                f"and a split of {', '.join(SPLITS)}")
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split).shuffle(SHUFFLE_SEED)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        # the dataset's own labels: mostly A-E, numbers 1-5 for a few questions
        letters = row["choices"]["label"]
        if row["answerKey"] not in letters:
            raise PicochatError(f"ARC question {row['id']}: answer {row['answerKey']!r} is not one of {letters}")
        messages = [{"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                    {"role": "assistant", "content": row["answerKey"]}]
        return {"messages": messages, "letters": letters}
