"""The task framework of chat training and evaluation: a Task is a sliced view of a list of
conversations, each a dict {"messages": [...], ...} in the chat schema of picochat.tokenizer;
mixtures and sequences combine tasks; render_mc formats a multiple-choice prompt.

Where the data comes from is picochat.tasks.data; load_hub_dataset and HubDataset are
importable from here too, so a task module needs one import.
"""

import random

from picochat.common import PicochatError
from picochat.tasks.data import HubDataset, load_hub_dataset

__all__ = ["HubDataset", "MultipleChoiceTask", "SHUFFLE_SEED", "Task", "TaskMixture", "TaskSequence",
           "check_messages", "load_hub_dataset", "render_mc"]

# Every Hub task shuffles its rows with this seed, as the reference does, so a slice such as
# GSM8K(stop=420) holds the same problems as the reference's.
SHUFFLE_SEED = 42


class Task:
    """Examples start, start+step, ... (below stop, or all of them) of what get_example returns.
    Subclasses implement num_examples, get_example, eval_type and evaluate."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise PicochatError(f"a task slice needs start >= 0, stop >= 0 and step >= 1 "
                                f"(got start={start}, stop={stop}, step={step})")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    @property
    def eval_type(self) -> str:
        """Either categorical (the answer is one of conversation["letters"]) or generative (free text)."""
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    def __len__(self) -> int:
        # like a Python slice, a stop past the end means the end
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} of a task with {n}")
        return self.get_example(self.start + i * self.step)


class MultipleChoiceTask(Task):
    """A categorical task: the assistant's content is the correct letter, conversation["letters"]
    the allowed ones, and the completion to evaluate is the predicted letter."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion == conversation["messages"][-1]["content"]


class TaskMixture(Task):
    """All examples of the tasks, shuffled once with random.Random(42). A task passed twice is
    seen twice as often."""

    def __init__(self, tasks: list[Task], **slice_args):
        super().__init__(**slice_args)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """All examples of the first task, then all of the second, and so on."""

    def __init__(self, tasks: list[Task], **slice_args):
        super().__init__(**slice_args)
        self.tasks = tasks

    def num_examples(self) -> int:
        return sum(len(task) for task in self.tasks)

    def get_example(self, index: int) -> dict:
        for task in self.tasks:
            if index < len(task):
                return task[index]
            index -= len(task)
        raise IndexError(index)


def render_mc(question: str, letters, choices) -> str:
    """The multiple-choice prompt. Each letter follows its choice with no space after "=", so the
    letter in the prompt is the same token as the bare-letter answer."""
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{options}\nRespond only with the letter of the correct answer."


def check_messages(messages, where: str) -> list[dict]:
    """Messages of a conversation read from data: an optional leading system message, then user and
    assistant alternating from user, at least one of each, all with string content. `where` names
    the row or line in the error."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise PicochatError(f"{where}: expected a list of {{role, content}} messages")
    first = 1 if messages and messages[0].get("role") == "system" else 0
    rest = messages[first:]
    if len(rest) < 2:
        raise PicochatError(f"{where}: a conversation needs at least a user and an assistant message")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise PicochatError(f"{where}: message {first + i} has role {message.get('role')!r}, expected {expected!r} "
                                "(user and assistant alternate, after an optional system message)")
    if not all(isinstance(m.get("content"), str) for m in messages):
        raise PicochatError(f"{where}: every message needs string content")
    return messages
