"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT, ~460K in train
and ~24K in test, some opening with a system message."""

from picochat.common import PicochatError
from picochat.tasks.common import SHUFFLE_SEED, Task, check_messages, load_hub_dataset

SPLITS = ("train", "test")


class SmolTalk(Task):
    def __init__(self, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise PicochatError(f"SmolTalk has no split {split!r} (choose {' or '.join(SPLITS)})")
        self.ds = load_hub_dataset("HuggingFaceTB/smol-smoltalk", "default", split).shuffle(SHUFFLE_SEED)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        check_messages(messages, f"SmolTalk {index}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
