"""Conversations of your own, e.g. the model's identity: a JSONL file with one conversation per
line, either a list of {"role", "content"} messages or {"messages": [...]} (user and assistant
alternating from user, after an optional system message; string content)."""

import json
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.common import Task, check_messages


class CustomJSON(Task):
    def __init__(self, path, **slice_args):
        super().__init__(**slice_args)
        path = Path(path).expanduser()
        if not path.is_file():
            raise PicochatError(f"{path}: no such conversations file")
        self.conversations = []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        self.conversations.append(_parse(line, f"{path}:{lineno}"))
        except UnicodeDecodeError:
            raise PicochatError(f"{path} is not UTF-8 text") from None

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": [dict(m) for m in self.conversations[index]]}


def _parse(line: str, where: str) -> list[dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PicochatError(f"{where}: not valid JSON ({e.msg})") from None
    messages = row.get("messages") if isinstance(row, dict) else row
    return check_messages(messages, where)
