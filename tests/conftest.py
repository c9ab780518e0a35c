"""Shared fixtures. Every test builds its own data (tests/synthetic.py): a generated pretraining
corpus, a tokenizer trained on it in seconds, a 22-task CORE bundle in the real format. No test
reads ../shared or the network, so a plain clone runs all of them; larger checks on real data
are benchmarks (bench/)."""

import os
import socket
from pathlib import Path

# Inductor compiles in this process, not in a pool of workers: tests fork processes after
# compiling (test_optim, test_base_train), and a forked child that loads a cached graph waited
# forever on the parent's pool (seen in a full run: the suite hung in test_optim)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

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


@pytest.fixture(scope="session")
def base_home(tmp_path_factory, pretrain_dir, small_tokenizer):
    """A $PICOCHAT_HOME with the small tokenizer and a tiny base model (tag d2: depth 2, T=64)
    trained 40 steps on the corpus, built once for the tests of the stages that load a model.
    Tests point PICOCHAT_HOME at it and must not change it (copy it to write)."""
    from picochat.stages import base_train

    home = tmp_path_factory.mktemp("base_home")
    small_tokenizer.save(home / "tokenizer")
    config = base_train.TrainConfig(depth=2, max_seq_len=64, head_dim=64, window_pattern="L", device_batch_size=4,
                                    total_batch_size=512, embedding_lr=3.0, unembedding_lr=0.08, matrix_lr=0.2,
                                    num_iterations=40, warmup_steps=5, eval_every=-1, core_metric_every=-1,
                                    sample_every=-1, save_every=-1, dataset=str(pretrain_dir), model_tag="d2",
                                    compile="off", device_type="cpu")
    saved = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    try:
        base_train.run(config)
    finally:
        if saved is None:
            del os.environ["PICOCHAT_HOME"]
        else:
            os.environ["PICOCHAT_HOME"] = saved
    return home
