"""A toy task for chat-rl's tests: short prompts whose reward is 1 when the completion starts with
TARGET (RL_TOY_TARGET sets another, also for a subprocess), else 0. chat-rl builds it as it builds
a task of one's own: `--task rl_toy:FirstWord`, FirstWord(split=...)."""

import os

from picochat.tasks.common import Task

# a first word the tiny test model samples ~4% of the time after a chat prompt (" the": ~9%)
TARGET = os.environ.get("RL_TOY_TARGET", " too")
PROMPTS = ["Say something.", "Go on.", "Tell me.", "What now?", "Speak.", "Begin.", "Next?", "Well?"]


class FirstWord(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        self.split = split

    def num_examples(self) -> int:
        return len(PROMPTS) * (4 if self.split == "train" else 1)

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]},
                             {"role": "assistant", "content": TARGET}]}

    def reward(self, conversation: dict, completion: str) -> float:
        return float(completion.startswith(TARGET))
