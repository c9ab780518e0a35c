"""Shared fixtures. Every test builds its own data (tests/synthetic.py): a generated pretraining
corpus, a tokenizer trained on it in seconds, a 22-task CORE bundle in the real format. No test
reads ../shared or the network, so a plain clone runs all of them; larger checks on real data
are benchmarks (bench/)."""

import socket
from pathlib import Path

import pytest
from synthetic import write_core_bundle, write_corpus

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def picochat_home(tmp_path, monkeypatch):
    """A fresh $PICOCHAT_HOME for one test."""
    home = tmp_path / "picochat_home"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory):
    """Two generated shards (see synthetic.write_corpus); shard_00001 is the validation split."""
    return write_corpus(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="session")
def small_tokenizer(pretrain_dir):
    """A real BPE tokenizer (vocab 1024) trained on the corpus's training shard."""
    from picochat.dataset import parquets_iter_batched
    from picochat.tokenizer import Tokenizer

    def texts():
        for batch in parquets_iter_batched("train", data_dir=pretrain_dir):
            yield from batch

    return Tokenizer.train_from_iterator(texts(), vocab_size=1024)


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory):
    """A CORE eval bundle with all 22 tasks, 12 examples each (see synthetic.write_core_bundle);
    tests point PICOCHAT_EVAL_BUNDLE at it."""
    return write_core_bundle(tmp_path_factory.mktemp("eval_bundle"))
