"""HumanEval (openai/openai_humaneval): 164 Python functions to complete from their signature
and docstring, each checked by running its unit tests in the sandbox."""

import re

from picochat.sandbox import run_python
from picochat.tasks.common import SHUFFLE_SEED, Task, load_hub_dataset

TIMEOUT = 5.0  # seconds per program; the slowest canonical solution takes well under one
FENCED_CODE_RE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n```", re.DOTALL)


def leading_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (before its first other code), which a completion
    that restates only the function would lose."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def completion_code(completion: str) -> str:
    """The first fenced code block of a completion, or else all of it."""
    match = FENCED_CODE_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    prompt = conversation["messages"][0]["content"]
    return (f"{leading_imports(prompt)}\n\n{completion_code(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})")


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **slice_args):
        super().__init__(**slice_args)
        self.ds = load_hub_dataset("openai/openai_humaneval", "openai_humaneval", "test").shuffle(SHUFFLE_SEED)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}]
        return {"messages": messages, "task_id": row["task_id"], "entry_point": row["entry_point"],
                "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Passes iff the program (imports, completion, tests, check call) exits cleanly in time."""
        return run_python(build_program(conversation, completion), timeout=TIMEOUT).success
