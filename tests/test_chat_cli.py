"""`picochat chat-cli` on the tiny trained base model: one-shot, under a pseudo-terminal, errors."""

import io
import os
import pty
import select
import subprocess
import sys
import time

import torch
from conftest import REPO

from picochat.checkpoint import load_model
from picochat.engine import Engine
from picochat.stages.chat_cli import Chat, ChatCliConfig


def env_for(home):
    return {"PATH": os.environ["PATH"], "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def greedy_by_recomputation(model, tokenizer, tokens, max_tokens):
    """The answer the slow obvious way: the full forward for every new token."""
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([tokens + out]))[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
    return tokenizer.decode(out)


def test_one_shot_prints_the_answer(base_home, monkeypatch):
    result = subprocess.run([sys.executable, "-m", "picochat", "chat-cli", "-p", "The river", "-t", "0",
                             "--max-tokens", "24", "--device-type", "cpu"], capture_output=True, text=True,
                            env=env_for(base_home), stdin=subprocess.DEVNULL, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("PICOCHAT_HOME", str(base_home))
    model, tok, _ = load_model("base", "cpu", torch.float32)
    S = tok.encode_special
    prompt = [tok.get_bos_token_id(), S("<|user_start|>"), *tok.encode("The river"), S("<|user_end|>"),
              S("<|assistant_start|>")]
    expected = greedy_by_recomputation(model, tok, prompt, 24)
    assert expected.strip()  # the model says something, so the comparison means something
    assert result.stdout == expected + "\n"


def test_no_checkpoint_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "picochat", "chat-cli", "-p", "hi"], capture_output=True,
                            text=True, env=env_for(tmp_path), stdin=subprocess.DEVNULL, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no model checkpoints") and "picochat base-train" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, "-m", "picochat", "chat-cli", "-i", "sft", "-p", "hi"],
                            capture_output=True, text=True, env=env_for(tmp_path), cwd=REPO, timeout=60)
    assert result.returncode == 1 and "`picochat chat-sft` creates them" in result.stderr


def read_until(fd, marker: str, timeout=60.0) -> str:
    """What the terminal shows until marker appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {seen.decode(errors='replace')!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"terminal closed before {marker!r}: {seen.decode(errors='replace')!r}"
            seen += chunk
    return seen.decode(errors="replace")


def test_interactive_under_a_terminal(base_home):
    pid, fd = pty.fork()
    if pid == 0:  # the child: chat-cli with the pseudo-terminal as its stdin and stdout
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "picochat", "chat-cli", "-t", "0", "--max-tokens", "12",
                                   "--device-type", "cpu"], env_for(base_home))
    try:
        assert "model: base checkpoint d2, step 40" in read_until(fd, "User: ")
        os.write(fd, b"The river\n")
        shown = read_until(fd, "User: ")
        answer = shown.split("Assistant: ", 1)[1].rsplit("User: ", 1)[0].strip()
        assert answer  # streamed text arrived before the next prompt
        os.write(fd, b"The river\n")  # the same words a second time: now with the first exchange before them
        read_until(fd, "User: ")
        os.write(fd, b"clear\n")
        assert "(new conversation)" in read_until(fd, "User: ")
        os.write(fd, b"The river\n")
        again = read_until(fd, "User: ").split("Assistant: ", 1)[1].rsplit("User: ", 1)[0].strip()
        assert again == answer  # a cleared conversation answers as the first one did (greedy)
        os.write(fd, b"quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_the_conversation_is_kept_and_ctrl_c_stops_one_answer(base_home, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(base_home))
    model, tok, _ = load_model("base", "cpu", torch.float32)
    S = tok.encode_special
    engine = Engine(model, tok)

    class Interrupted(Engine):
        def generate(self, *args, **kwargs):
            for i, item in enumerate(engine.generate(*args, **kwargs)):
                if i == 3:
                    raise KeyboardInterrupt
                yield item

    out = io.StringIO()
    chat = Chat(engine, ChatCliConfig(temperature=0.0, max_tokens=8), out=out)
    first = chat.reply("Hello")
    turn = [S("<|user_start|>"), *tok.encode("Hello"), S("<|user_end|>"), S("<|assistant_start|>")]
    assert chat.tokens[:len(turn) + 1] == [tok.get_bos_token_id(), *turn]
    assert chat.tokens[-1] == S("<|assistant_end|>") and tok.decode(chat.tokens[len(turn) + 1:-1]) == first
    kept = list(chat.tokens)
    chat.engine = Interrupted(model, tok)
    cut = chat.reply("Hello")
    assert out.getvalue().endswith(" [stopped]\n")
    answer = chat.tokens[len(kept) + len(turn):-1]
    assert chat.tokens == kept + turn + answer + [S("<|assistant_end|>")]
    assert len(answer) == 3 and tok.decode(answer) == cut
