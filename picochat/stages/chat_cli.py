"""`picochat chat-cli`: talk to a model in the terminal, the answer streamed as it is generated.

Interactive by default: type a message, read the answer; `clear` starts a new conversation,
`quit` or `exit` (or Ctrl-D) leaves. Ctrl-C during an answer stops that answer only.
`-p "prompt"` answers one prompt and exits, reading nothing from stdin (for scripts).
The model is the latest checkpoint of the most trained stage (rl, then sft, then base) unless
-i/-g/-s say otherwise, or a folder written by `picochat export` (-i hf --path DIR).
"""

import argparse
import sys
from dataclasses import dataclass

from picochat.cli import HelpFormatter
from picochat.common import PicochatError, compute_init
from picochat.engine import MODEL_SOURCES, load_engine, resolve_model


@dataclass
class ChatCliConfig:
    source: str | None = None  # base, sft, rl or hf (None: the most trained stage with a checkpoint)
    model_tag: str | None = None  # None: the largest d<N> tag, else the newest
    step: int | None = None  # None: the last complete checkpoint
    path: str | None = None  # with source hf: the exported folder
    prompt: str = ""  # one-shot mode: answer this and exit
    temperature: float = 0.6
    top_k: int = 50
    max_tokens: int = 256  # per answer
    seed: int = 42
    device_type: str = ""  # cuda, mps or cpu ("" = autodetect)


class Chat:
    """A conversation as the token list the model sees, starting at <|bos|>."""

    def __init__(self, engine, config: ChatCliConfig, out=sys.stdout):
        self.engine, self.config, self.out = engine, config, out
        tok = engine.tokenizer
        self.bos = tok.get_bos_token_id()
        self.user_start, self.user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
        self.assistant_start = tok.encode_special("<|assistant_start|>")
        self.assistant_end = tok.encode_special("<|assistant_end|>")
        self.turn = 0
        self.clear()

    def clear(self):
        self.tokens = [self.bos]

    def reply(self, message: str) -> str:
        """Add the user's message, stream the answer to out, keep it in the conversation."""
        tok = self.engine.tokenizer
        prompt = [*self.tokens, self.user_start, *tok.encode(message), self.user_end, self.assistant_start]
        answer, shown = [], ""
        try:
            generator = self.engine.generate(prompt, 1, max_tokens=self.config.max_tokens,
                                             temperature=self.config.temperature, top_k=self.config.top_k,
                                             seed=self.config.seed + self.turn)
            for [token], _ in generator:
                if token in self.engine.stop_tokens:
                    break
                answer.append(token)
                text = tok.decode(answer)
                if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                    self.out.write(text[len(shown):])
                    self.out.flush()
                    shown = text
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write(tok.decode(answer)[len(shown):] + "\n")
        self.out.flush()
        self.turn += 1
        # the answer ends with <|assistant_end|> even when it was cut short, as the model expects
        self.tokens = [*prompt, *answer, self.assistant_end]
        return tok.decode(answer)


def interactive(chat: Chat):
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    print("picochat chat: type a message; 'clear' starts over, 'quit' or 'exit' leaves.")
    while True:
        try:
            message = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message in ("quit", "exit"):
            return
        if message == "clear":
            chat.clear()
            print("(new conversation)")
            continue
        if not message:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            chat.reply(message)
        except PicochatError as e:  # e.g. the conversation outgrew the model: say so and go on
            print(f"\nerror: {e} ('clear' starts a new conversation)")


def run(config: ChatCliConfig):
    if config.temperature < 0 or config.top_k < 0 or config.max_tokens <= 0:
        raise PicochatError("--temperature and --top-k must be >= 0 and --max-tokens > 0")
    source, tag, step = resolve_model(config.source, config.model_tag, config.step, config.path)
    rt = compute_init(config.device_type)
    engine, _ = load_engine(source, rt.device, rt.dtype, tag, step, config.path)
    chat = Chat(engine, config)
    if config.prompt:
        chat.reply(config.prompt)
        return
    what = f"exported folder {config.path}" if source == "hf" else f"{source} checkpoint {tag}"
    print(f"model: {what}, step {step} ({rt.device}, {rt.dtype})")
    interactive(chat)


def main(argv=None):
    d = ChatCliConfig()
    p = argparse.ArgumentParser(prog="picochat chat-cli", formatter_class=HelpFormatter,
                                description="Chat with a model in the terminal (answers are streamed).")
    p.add_argument("-i", "--source", default=d.source, choices=MODEL_SOURCES,
                   help="checkpoint stage: base, sft or rl (if not given: the most trained one there is), or hf: "
                        "a folder written by picochat export, given by --path")
    p.add_argument("-g", "--model-tag", default=d.model_tag,
                   help="checkpoint tag, e.g. d20 (if not given: the largest d<N> tag, else the newest)")
    p.add_argument("-s", "--step", type=int, default=d.step, help="checkpoint step (if not given: the last)")
    p.add_argument("--path", default=d.path, help="with -i hf: the exported model folder")
    p.add_argument("-p", "--prompt", default=d.prompt, help="answer this one prompt, print it and exit")
    p.add_argument("-t", "--temperature", type=float, default=d.temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=d.top_k, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="longest answer, in tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed of the first answer (then +1 each)")
    p.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu (if not given: autodetect)")
    run(ChatCliConfig(**vars(p.parse_args(argv))))
