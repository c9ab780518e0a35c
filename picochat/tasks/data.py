"""Task data, downloaded once per machine into $PICOCHAT_HOME/task_data and read from there.

Hub datasets replace the Hugging Face `datasets` library: the Hub's parquet export of a
(repo, subset, split) is listed with GET {HUB_API}/{repo}/parquet/{subset}/{split} (a JSON list
of file URLs) and fetched to

    task_data/<repo with "/" -> "--">/<subset>/<split>/00000.parquet, 00001.parquet, ...
    task_data/<repo with "/" -> "--">/<subset>/<split>/manifest.json

manifest.json ({"files": [...], "source": ..., ...}) is written last, so its presence marks a
complete download; a split folder without one is fetched again from scratch. The word list of
the spelling tasks is task_data/words_alpha.txt.

Mirror. PICOCHAT_TASK_DATA_URL, an http(s) URL or a local folder, replaces the Hub and GitHub
for all task data. It has the layout of task_data itself (a copy of another machine's
$PICOCHAT_HOME/task_data is a mirror): each split folder holds a manifest.json whose "files"
names its parquet files in order, and words_alpha.txt sits at the root, e.g.

    <mirror>/allenai--ai2_arc/ARC-Easy/test/manifest.json   {"files": ["00000.parquet"]}
    <mirror>/allenai--ai2_arc/ARC-Easy/test/00000.parquet
    <mirror>/words_alpha.txt

A lock file next to each download (fcntl.flock) makes concurrent processes, e.g. the ranks of a
torchrun job, download once: the first fetches while the others wait, then all read the cache.
"""

import fcntl
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from picochat.common import PicochatError, get_base_dir, is_url
from picochat.dataset import PermanentError, fetch_once, first_line

MIRROR_ENV = "PICOCHAT_TASK_DATA_URL"
HUB_API = "https://huggingface.co/api/datasets"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
WORDS_FILE = "words_alpha.txt"
MANIFEST = "manifest.json"
LISTING = "listing.json"  # what the source said the split holds, kept for the record

ATTEMPTS = 5
BACKOFF = 2.0  # seconds before the second attempt, doubling after each failure
TIMEOUT = 30.0


def task_data_dir() -> Path:
    return get_base_dir() / "task_data"


def split_dir(repo: str, subset: str, split: str) -> Path:
    return task_data_dir() / repo.replace("/", "--") / subset / split


# ---------------------------------------------------------------------------
# Reading


class HubDataset:
    """The rows of one split, in the order of an index array (all rows, or a permutation of them)."""

    def __init__(self, table: pa.Table, indices: np.ndarray | None = None):
        self.table = table
        self.indices = np.arange(table.num_rows) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])  # numpy raises IndexError out of range, and counts negatives from the end
        return self.table.slice(row, 1).to_pylist()[0]

    def shuffle(self, seed: int) -> "HubDataset":
        """The same order as datasets.Dataset.shuffle(seed=seed), so slices of a task select the
        reference's examples."""
        return HubDataset(self.table, self.indices[np.random.default_rng(seed).permutation(len(self))])


def load_hub_dataset(repo: str, subset: str, split: str) -> HubDataset:
    """One split of a Hub dataset, downloaded on first use (see the module docstring)."""
    folder = split_dir(repo, subset, split)
    if not (folder / MANIFEST).exists():
        with _locked(folder.with_name(split + ".lock")):
            if not (folder / MANIFEST).exists():  # another process may have finished while we waited
                _download_split(repo, subset, split, folder)
    return HubDataset(_read_split(folder))


def _read_split(folder: Path) -> pa.Table:
    files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    tables = []
    for name in files:
        try:
            tables.append(pq.read_table(folder / name))
        except (OSError, pa.ArrowException) as e:
            raise PicochatError(f"{folder / name}: not a readable parquet file ({first_line(e)}); "
                                f"delete {folder} to download it again") from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as e:
        raise PicochatError(f"{folder}: its parquet files do not share one schema ({first_line(e)})") from None


def load_word_list() -> list[str]:
    """The dwyl english-words list (words_alpha.txt, one lowercase word per line), downloaded on first use."""
    path = task_data_dir() / WORDS_FILE
    if not path.exists():
        with _locked(path.with_name(WORDS_FILE + ".lock")):
            if not path.exists():
                source = _source(WORDS_FILE) if _mirror() else WORDS_URL
                print(f"downloading the word list from {source}", flush=True)
                _fetch_or_fail(source, path, _check_words, "the word list")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Downloading


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # closing the file releases it, also when the process dies
        yield


def _mirror() -> str | None:
    base = os.environ.get(MIRROR_ENV)
    if not base:
        return None
    if is_url(base):
        return base.rstrip("/")
    if "://" in base:
        raise PicochatError(f"{MIRROR_ENV}={base!r}: only http(s) URLs and local folders are supported")
    if not Path(base).expanduser().is_dir():
        raise PicochatError(f"{MIRROR_ENV}={base!r} is neither an http(s) URL nor an existing folder")
    return str(Path(base).expanduser())


def _source(*names: str) -> str:
    """Where a file of the mirror lives."""
    return _join(_mirror(), *names)


def _join(base: str, *names: str) -> str:
    return "/".join([base, *names]) if is_url(base) else str(Path(base, *names))


def _download_split(repo: str, subset: str, split: str, folder: Path):
    what = f"{repo} {subset}/{split}"
    shutil.rmtree(folder, ignore_errors=True)  # whatever an interrupted download left behind
    folder.mkdir(parents=True)
    if _mirror():
        split_source = _source(repo.replace("/", "--"), subset, split)
        listing_source = _join(split_source, MANIFEST)
    else:
        split_source = listing_source = f"{HUB_API}/{repo}/parquet/{subset}/{split}"
    _fetch_or_fail(listing_source, folder / LISTING, _check_listing, what)
    listing = json.loads((folder / LISTING).read_text(encoding="utf-8"))
    # the Hub lists full URLs; a mirror's manifest names the files of its split folder
    sources = listing if isinstance(listing, list) else [_join(split_source, name) for name in listing["files"]]
    print(f"downloading {what} ({len(sources)} file{'s' * (len(sources) != 1)}) from {split_source}", flush=True)
    files = [f"{k:05d}.parquet" for k in range(len(sources))]
    for source, name in zip(sources, files):
        _fetch_or_fail(source, folder / name, _check_parquet, what)
    manifest = {"repo": repo, "subset": subset, "split": split, "source": split_source, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def _check_listing(path: Path):
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the file list is not JSON ({e})") from None
    names = listing.get("files") if isinstance(listing, dict) else listing
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PermanentError("the file list is neither a JSON list of URLs nor a manifest with a \"files\" list")
    if not names:
        raise PermanentError("the source lists no parquet files for it")


def _check_parquet(path: Path):
    with pq.ParquetFile(path):  # opening reads the footer, so a truncated or corrupt file raises here
        pass


def _check_words(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not text.strip():
        raise ValueError("the file is empty")


def _fetch_or_fail(source: str, final: Path, check, what: str):
    try:
        _fetch(source, final, check)
    except PermanentError as e:
        hint = "" if os.environ.get(MIRROR_ENV) else f" (offline? point {MIRROR_ENV} at a mirror)"
        raise PicochatError(f"cannot download {what}: {e}{hint}") from None


def _fetch(source: str, final: Path, check):
    """Fetch one file to `final` via `final`.tmp, running check(tmp) before the rename; retries
    with backoff. dataset.fetch_shard does the same for pretraining shards, but its check is
    fixed to a parquet file with a text column, which no task file is."""
    tmp = final.with_name(final.name + ".tmp")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            fetch_once(source, tmp, TIMEOUT, threading.Event(), final.name)
            check(tmp)
            os.replace(tmp, final)
            return
        except (OSError, ValueError, pa.ArrowException) as e:  # requests' errors are OSErrors
            if attempt == ATTEMPTS:
                raise PermanentError(f"{source}: failed after {ATTEMPTS} attempt{'s' * (ATTEMPTS > 1)}: "
                                     f"{first_line(e)}") from None
            delay = BACKOFF * 2 ** (attempt - 1)
            tqdm.write(f"{final.name}: attempt {attempt}/{ATTEMPTS} failed ({first_line(e)}); retrying in {delay:g}s")
        finally:
            tmp.unlink(missing_ok=True)
        time.sleep(delay)
