"""Pretraining text: where the parquet shards live, how they split into train and
val, how to iterate them, and how to fetch or convert them (the `download` stage
is picochat/stages/download.py).

Data format. A dataset is a folder of `*.parquet` files, each with a string
column `text` (one document per row; other columns are ignored), written in row
groups (1024 rows in the hosted shards). Files are taken in name order. The
LAST file is the validation split and every other file is training data, so a
folder needs at least two files to train on. The hosted datasets name their
files `shard_00000.parquet` ... `shard_NNNNN.parquet`; any names that sort in
the intended order work for a folder of your own.

Where the data comes from:
- a named dataset (`fineweb-edu`, the default, or `climbmix`): shards are
  fetched from their hosting URL into $PICOCHAT_HOME/<dir> by `picochat
  download`. PICOCHAT_DATA_URL (or --base-url) points the download at another
  http(s) server or a local folder with the same file names instead.
- a folder of your own: pass its path wherever a dataset name is accepted.
  `picochat download --convert` turns `.jsonl` files (a "text" field per line)
  or `.txt` files (documents separated by blank lines) into such a folder.
"""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from tqdm import tqdm

from picochat.common import PicochatError, get_base_dir, is_url


@dataclass(frozen=True)
class DatasetSpec:
    """A hosted dataset: files shard_00000.parquet ... shard_{max_shard}.parquet under base_url."""
    base_url: str
    max_shard: int  # index of the last shard, which is always the validation split
    dir_name: str  # folder under $PICOCHAT_HOME

    def shard_name(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"


DATASETS = {
    "fineweb-edu": DatasetSpec("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/",
                               1822, "base_data"),
    "climbmix": DatasetSpec("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/",
                            6542, "base_data_climbmix"),
}
DEFAULT_DATASET = "fineweb-edu"
ROWS_PER_GROUP = 1024


# ---------------------------------------------------------------------------
# Listing, splits and reading


def data_dir_for(dataset: str) -> Path:
    """A named dataset lives in $PICOCHAT_HOME/<dir>; anything else is the path of the user's own folder."""
    if dataset in DATASETS:
        return get_base_dir() / DATASETS[dataset].dir_name
    return Path(dataset).expanduser()


def _is_named_dataset_dir(data_dir: Path) -> bool:
    return any(data_dir == data_dir_for(name) for name in DATASETS)


def list_parquet_files(data_dir) -> list[Path]:
    """The dataset's parquet files in name order (half-downloaded `.tmp` files are not listed)."""
    data_dir = Path(data_dir)
    # `picochat download` can fill a named dataset's folder, never the user's own one
    named = _is_named_dataset_dir(data_dir)
    if not data_dir.exists():
        if named:
            raise PicochatError(f"data folder {data_dir} does not exist: run `picochat download` first")
        raise PicochatError(f"data folder {data_dir} does not exist (give a named dataset, "
                            f"{' or '.join(DATASETS)}, or an existing folder of parquet files)")
    if not data_dir.is_dir():
        raise PicochatError(f"{data_dir} is not a folder of parquet files")
    files = sorted(p for p in data_dir.glob("*.parquet") if p.is_file())
    if not files:
        advice = "run `picochat download`" if named else "`picochat download --convert` turns your own text into shards"
        raise PicochatError(f"no .parquet files in {data_dir}: {advice}")
    return files


def split_files(data_dir, split: str) -> list[Path]:
    """val = the last file; train = all the others."""
    if split not in ("train", "val"):
        raise PicochatError(f"unknown split {split!r} (choose train or val)")
    files = list_parquet_files(data_dir)
    if split == "val":
        return files[-1:]
    if len(files) < 2:
        more = "e.g. `picochat download -n 1`" if _is_named_dataset_dir(Path(data_dir)) else "add a file"
        raise PicochatError(f"{data_dir} has only one parquet file ({files[0].name}), which is the validation "
                            f"split; training needs at least one more ({more})")
    return files[:-1]


class ShardError(Exception):
    """What is wrong with a parquet file, without its path (callers add the name they know it by)."""


def _open_checked(path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"not a readable parquet file ({first_line(e)})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise ShardError(f"no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ShardError(f"column 'text' holds {kind}, not strings")
    return pf


def first_line(e: Exception) -> str:
    """The first line of an error's message, for one-line errors (shards and task data alike)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_parquet(path) -> pq.ParquetFile:
    """Open a shard and check it has a string `text` column; problems become one PicochatError line."""
    try:
        return _open_checked(path)
    except ShardError as e:
        raise PicochatError(f"{path}: {e}") from None


def _texts(pf: pq.ParquetFile, path, rg_idx: int) -> list[str]:
    try:
        return pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise PicochatError(f"{path}: cannot read row group {rg_idx} ({first_line(e)})") from None


def num_row_groups(path) -> int:
    return open_parquet(path).num_row_groups


def read_row_group_texts(path, rg_idx: int) -> list[str]:
    return _texts(open_parquet(path), path, rg_idx)


def parquets_iter_batched(split: str, start: int = 0, step: int = 1, data_dir=None):
    """Yield the texts of row groups start, start+step, ... of each file of the split, file by file.
    data_dir defaults to the default dataset's folder."""
    data_dir = data_dir_for(DEFAULT_DATASET) if data_dir is None else data_dir
    for path in split_files(data_dir, split):
        pf = open_parquet(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield _texts(pf, path, rg_idx)


# ---------------------------------------------------------------------------
# Download: each shard streams to <name>.tmp and is renamed to its final name only
# once it is complete and opens as parquet with a text column, so a final name
# always holds a good shard and an interrupted run simply resumes.

CHUNK_BYTES = 1 << 20


class PermanentError(Exception):
    """A failure that retrying cannot fix (e.g. the file does not exist at the source)."""


class Interrupted(Exception):
    """Ctrl-C (or an unexpected error) asked every worker to stop."""


def shard_indices(spec: DatasetSpec, num_files: int) -> list[int]:
    """Shards 0..min(N, max)-1 for training, plus the last shard (validation) always; N=-1 means all."""
    if num_files < -1:
        raise PicochatError(f"-n must be -1 (all shards) or a count >= 0, got {num_files}")
    n = spec.max_shard if num_files == -1 else min(num_files, spec.max_shard)
    return list(range(n)) + [spec.max_shard]


def resolve_source(spec: DatasetSpec, base_url: str = "") -> str:
    """Where shards come from: --base-url, else $PICOCHAT_DATA_URL, else the dataset's host.
    Either an http(s) URL or a local folder with the same file names."""
    base = base_url or os.environ.get("PICOCHAT_DATA_URL") or spec.base_url
    if is_url(base):
        return base
    if "://" in base:
        raise PicochatError(f"data source {base!r}: only http(s) URLs and local folders are supported")
    if not Path(base).expanduser().is_dir():
        raise PicochatError(f"data source {base!r} is neither an http(s) URL nor an existing folder")
    return str(Path(base).expanduser())


@contextmanager
def _open_source(source: str, timeout: float):
    """(total bytes or None, iterator of chunks) of a URL or a local file."""
    if is_url(source):
        with requests.get(source, stream=True, timeout=timeout) as r:
            # Client errors other than timeouts and rate limits will not change on retry.
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                reason = "not found" if r.status_code == 404 else "refused"
                raise PermanentError(f"{reason} (HTTP {r.status_code}): {source}")
            r.raise_for_status()
            total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
            yield total, r.iter_content(CHUNK_BYTES)
        return
    path = Path(source)
    if not path.is_file():
        raise PermanentError(f"not found: {path}")
    with open(path, "rb") as f:
        yield path.stat().st_size, iter(lambda: f.read(CHUNK_BYTES), b"")


def fetch_once(source: str, tmp: Path, timeout: float, stop: threading.Event, name: str):
    """One attempt to copy source (URL or path) to tmp with a progress bar; the task-data download
    (tasks/data.py) retries it under its own checks."""
    with _open_source(source, timeout) as (total, chunks), open(tmp, "wb") as out, \
            tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        written = 0
        for chunk in chunks:
            if stop.is_set():
                raise Interrupted()
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    if total is not None and written != total:
        raise OSError(f"transfer ended after {written} of {total} bytes")


def fetch_shard(source: str, final: Path, attempts: int = 5, backoff: float = 2.0, timeout: float = 30.0,
                stop: threading.Event | None = None):
    """Fetch one file to `final` via `final`.tmp, validating before the rename. Waits backoff * 2^k
    seconds between attempts. Raises PermanentError (incl. after the last attempt) or Interrupted."""
    stop = stop or threading.Event()
    tmp = final.with_name(final.name + ".tmp")
    for attempt in range(1, attempts + 1):
        try:
            fetch_once(source, tmp, timeout, stop, final.name)
            _open_checked(tmp)
            os.replace(tmp, final)
            return
        except (OSError, ShardError) as e:  # requests' errors are OSErrors too
            if attempt == attempts:
                tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
                raise PermanentError(f"failed after {tries}: {first_line(e)}") from None
            delay = backoff * 2 ** (attempt - 1)
            tqdm.write(f"{final.name}: attempt {attempt}/{attempts} failed ({first_line(e)}); "
                       f"retrying in {delay:g}s")
        finally:
            tmp.unlink(missing_ok=True)
        if stop.wait(delay):
            raise Interrupted()


def download_shards(spec: DatasetSpec, data_dir, num_files: int = -1, workers: int = 4, base_url: str = "",
                    attempts: int = 5, backoff: float = 2.0, timeout: float = 30.0) -> dict:
    """Fetch the shards `num_files` asks for into data_dir, skipping those already there.
    Returns {"downloaded": [names], "skipped": [names]}; raises PicochatError if any shard failed."""
    if workers < 1:
        raise PicochatError(f"--workers must be >= 1, got {workers}")
    if attempts < 1:
        raise PicochatError(f"attempts must be >= 1, got {attempts}")
    source = resolve_source(spec, base_url)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [spec.shard_name(i) for i in shard_indices(spec, num_files)]
    skipped = [n for n in names if (data_dir / n).exists()]
    todo = [n for n in names if not (data_dir / n).exists()]
    print(f"{len(names)} shards wanted ({len(names) - 1} train + validation {names[-1]}) in {data_dir}: "
          f"{len(skipped)} already there, fetching {len(todo)} from {source}", flush=True)

    join = (lambda n: source.rstrip("/") + "/" + n) if is_url(source) else (lambda n: str(Path(source) / n))
    downloaded, failed = [], []
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(fetch_shard, join(n), data_dir / n, attempts, backoff, timeout, stop): n
                   for n in todo}
        with tqdm(total=len(todo), desc="shards", unit="file") as bar:
            for fut in as_completed(futures):
                name = futures[fut]
                try:
                    fut.result()
                    downloaded.append(name)
                except PermanentError as e:
                    failed.append((name, str(e)))
                    tqdm.write(f"{name}: {e}")
                bar.update(1)
    except BaseException:
        stop.set()  # Ctrl-C: workers stop at their next chunk and delete their .tmp files
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    print(f"done: {len(downloaded)} downloaded, {len(skipped)} skipped (already there), {len(failed)} failed",
          flush=True)
    for name, reason in sorted(failed):
        print(f"  failed {name}: {reason}", flush=True)
    if failed:
        name, reason = sorted(failed)[0]
        more = f" (and {len(failed) - 1} more, listed above)" if len(failed) > 1 else ""
        raise PicochatError(f"{len(failed)} of {len(todo)} shards failed: {name}: {reason}{more}; "
                            "run the same command again to retry")
    return {"downloaded": sorted(downloaded), "skipped": skipped}


# ---------------------------------------------------------------------------
# Your own corpus: .jsonl / .txt -> parquet shards in the layout above


def iter_documents(path):
    """Documents of one file: .jsonl has a "text" string per line; .txt has documents separated by
    blank lines. Empty documents are dropped."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise PicochatError(f"{path}: cannot convert {path.suffix or 'a file without extension'} "
                            "(use .jsonl with a \"text\" field per line, or .txt with blank-line-separated documents)")
    if not path.is_file():
        raise PicochatError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PicochatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise PicochatError(f"{path}:{lineno}: expected an object with a string \"text\" field")
                    if row["text"]:
                        yield row["text"]
            else:
                lines = []
                for line in f:
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        yield "".join(lines).rstrip("\n")
                        lines = []
                if lines:
                    yield "".join(lines).rstrip("\n")
    except UnicodeDecodeError:
        raise PicochatError(f"{path} is not UTF-8 text") from None


def _write_shard(texts: list[str], final: Path):
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=ROWS_PER_GROUP,
                   compression="zstd")
    os.replace(tmp, final)


def convert_to_parquet(inputs, output_dir, docs_per_shard: int = 65536, val_docs: int = 8192) -> list[Path]:
    """Write the documents of `inputs` (in order) to output_dir/shard_NNNNN.parquet: training shards of
    docs_per_shard documents, then a separate last shard holding the final min(val_docs, a tenth of the
    corpus, at least 1) documents as the validation split. Returns the shard paths."""
    if docs_per_shard < 1 or val_docs < 1:
        raise PicochatError("--docs-per-shard and --val-docs must be >= 1")
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.glob("*.parquet"))):
        raise PicochatError(f"{out} already holds parquet files (or is not a folder); choose a new output folder")
    inputs = [Path(p) for p in inputs]

    def documents():
        for path in inputs:
            yield from iter_documents(path)

    # Two passes (count, then write) keep memory at one shard while knowing where validation starts.
    total = sum(1 for _ in documents())
    if total < 2:
        raise PicochatError(f"found {total} document(s) in {', '.join(map(str, inputs))}; "
                            "need at least 2 (one for training, one for validation)")
    n_val = min(val_docs, max(1, total // 10))
    n_train = total - n_val
    out.mkdir(parents=True, exist_ok=True)
    paths, buf = [], []
    for i, doc in enumerate(documents()):
        buf.append(doc)
        if i < n_train and (len(buf) == docs_per_shard or i + 1 == n_train):
            paths.append(out / f"shard_{len(paths):05d}.parquet")
            _write_shard(buf, paths[-1])
            buf = []
    if len(buf) != n_val:
        raise PicochatError("the input files changed while being converted; run the conversion again")
    paths.append(out / f"shard_{len(paths):05d}.parquet")
    _write_shard(buf, paths[-1])
    print(f"wrote {n_train} training documents in {len(paths) - 1} shard(s) and {n_val} validation documents "
          f"in {paths[-1].name} to {out}", flush=True)
    return paths
