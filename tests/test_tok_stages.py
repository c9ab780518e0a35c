"""The tok-train and tok-eval stages, end to end on the generated parquet corpus."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO

from picochat.common import PicochatError
from picochat.stages import tok_eval, tok_train
from picochat.tokenizer import SPECIAL_TOKENS, get_tokenizer, get_tokenizer_dir


def test_training_texts_respect_caps(pretrain_dir):
    config = tok_train.TokTrainConfig(max_chars=50_000, doc_cap=3_000, dataset=str(pretrain_dir))
    docs = list(tok_train.training_texts(config))
    first_docs = pq.read_table(pretrain_dir / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    # the document that crosses max_chars is kept whole (up to doc_cap), as in the reference
    assert sum(len(d) for d in docs[:-1]) <= 50_000 < sum(len(d) for d in docs)
    assert all(len(d) <= 3_000 for d in docs) and any(len(d) == 3_000 for d in docs)
    assert docs == [d[:3_000] for d in first_docs[:len(docs)]]


def test_tok_train_then_eval(pretrain_dir, picochat_home, capsys):
    config = tok_train.TokTrainConfig(max_chars=300_000, vocab_size=600, dataset=str(pretrain_dir))
    trained = tok_train.run(config)
    out = capsys.readouterr().out
    assert "chars/s" in out and "300,000 characters" in out

    tok_dir = get_tokenizer_dir()
    assert tok_dir == picochat_home / "tokenizer"
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 600
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(591, 600))
    text = "Fellow citizens of the Senate and of the House of Representatives"
    assert tok.encode(text) == trained.encode(text)
    token_bytes = torch.load(tok_dir / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (600,)
    assert int(token_bytes[tok.encode(text)].sum()) == len(text.encode())

    table = tok_eval.run(tok_eval.TokEvalConfig(dataset=str(pretrain_dir)))
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    header = lines[1].split()
    assert header[:2] == ["text", "bytes"] and "ours" in header
    rows = {line.split()[0]: line.split() for line in lines[3:] if not line.startswith("note")}
    name = pretrain_dir.name  # the folder names the dataset's rows
    assert set(rows) == {"news", "korean", "code", "math", "science", f"{name}-train", f"{name}-val"}
    news = rows["news"]
    assert news[1] == f"{len(tok_eval.NEWS.encode()):,}"
    assert news[6] == f"{len(tok.encode(tok_eval.NEWS)):,}"  # ours tokens
    gpt2_tokens = news[2]
    assert gpt2_tokens == "unavailable" or int(gpt2_tokens.replace(",", "")) > 0


def test_tok_eval_without_data_or_tokenizer(picochat_home, pretrain_dir):
    with pytest.raises(PicochatError, match="picochat tok-train"):
        tok_eval.run(tok_eval.TokEvalConfig())
    tok_train.run(tok_train.TokTrainConfig(max_chars=100_000, vocab_size=300, dataset=str(pretrain_dir)))
    table = tok_eval.run(tok_eval.TokEvalConfig(dataset="fineweb-edu"))  # never downloaded into this home
    assert "train/val rows omitted" in table and "fineweb-edu-train" not in table
    assert "science" in table


def test_tok_train_rejects_bad_config(picochat_home, pretrain_dir):
    with pytest.raises(PicochatError, match="vocab-size"):
        tok_train.run(tok_train.TokTrainConfig(vocab_size=264, dataset=str(pretrain_dir)))
    with pytest.raises(PicochatError, match="does not exist"):
        tok_train.run(tok_train.TokTrainConfig(vocab_size=300, dataset=str(picochat_home / "nothing")))
    with pytest.raises(PicochatError, match="merges"):  # 2,000 characters cannot support 4,000 merges
        tok_train.run(tok_train.TokTrainConfig(max_chars=2_000, vocab_size=4096 + 256, dataset=str(pretrain_dir)))
    assert not get_tokenizer_dir().exists() or not any(get_tokenizer_dir().iterdir())


def test_cli_error_is_one_line(picochat_home):
    env = {**os.environ, "PICOCHAT_HOME": str(picochat_home)}
    result = subprocess.run([sys.executable, "-m", "picochat", "tok-train", "--vocab-size", "100"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and "vocab-size" in result.stderr
