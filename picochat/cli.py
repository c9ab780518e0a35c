"""`picochat <stage> [flags]`: one entry point for every stage.

Each stage is a module in picochat/stages/ whose `main(argv)` parses its flags into a
config dataclass and calls `run(config)`. Works the same under `python -m picochat`
and `torchrun ... -m picochat`.
"""

import argparse
import importlib
import sys

from picochat.common import PicochatError

STAGES = {
    "download": ("picochat.stages.download", "download pretraining shards (and the validation shard)"),
    "tok-train": ("picochat.stages.tok_train", "train the BPE tokenizer"),
    "tok-eval": ("picochat.stages.tok_eval", "compare the tokenizer's compression with GPT-2 and GPT-4"),
    "base-train": ("picochat.stages.base_train", "pretrain the base model"),
    "base-eval": ("picochat.stages.base_eval", "evaluate a base model: CORE, bits per byte, samples"),
    "chat-cli": ("picochat.stages.chat_cli", "chat with a model in the terminal"),
    "chat-web": ("picochat.stages.chat_web", "serve a chat page and an OpenAI-compatible API"),
    "chat-sft": ("picochat.stages.chat_sft", "fine-tune a base model into a chat model"),
    "chat-rl": ("picochat.stages.chat_rl", "reinforcement learning on a task's reward (GSM8K by default)"),
    "report": ("picochat.stages.report", "write the run report (markdown + plots) from what the stages saved"),
    "chat-eval": ("picochat.stages.chat_eval",
                  "evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE"),
    "export": ("picochat.stages.export", "write a checkpoint in the Hugging Face format (transformers loads it)"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help, except where X is None, False or "" (nothing to
    show) or the help already names its default."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if "default:" in help_ or action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return help_
        return f"{help_} (default: {action.default})"


def usage() -> str:
    lines = ["usage: picochat <stage> [flags]   (picochat <stage> --help for a stage's flags)", "", "stages:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def run(stage_main, argv=None):
    """Run a stage's main, turning user errors into one line instead of a traceback."""
    try:
        stage_main(argv)
    except PicochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: '{stage}' is not a stage\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(STAGES[stage][0])
    sys.argv[0] = f"picochat {stage}"  # so argparse's usage line names the stage
    run(module.main, rest)
