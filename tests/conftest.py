"""Shared fixtures. Real data comes from ../shared/data (see its MANIFEST.md);
tests that need it skip with a reason when it is absent."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PICOCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts) -> Path:
    """A path inside ../shared/data, or skip the test when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


@pytest.fixture
def picochat_home(tmp_path, monkeypatch):
    """A fresh $PICOCHAT_HOME for one test."""
    home = tmp_path / "picochat_home"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def pretrain_dir():
    """The two real parquet shards (shard_00001 is the held-out last shard)."""
    return shared_path("pretrain")


@pytest.fixture(scope="session")
def small_tokenizer(pretrain_dir):
    """A real BPE tokenizer (vocab 1024) trained on the shared training shard."""
    from picochat.dataset import parquets_iter_batched
    from picochat.tokenizer import Tokenizer

    def texts():
        for batch in parquets_iter_batched("train", data_dir=pretrain_dir):
            yield from batch

    return Tokenizer.train_from_iterator(texts(), vocab_size=1024)
