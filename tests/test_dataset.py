"""Pretraining data: listing and splits, iteration, the download stage (against a real local
HTTP server with injected faults, and a local mirror folder), and corpus conversion."""

import json
import subprocess
import sys
import threading
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.common import PicochatError
from picochat.dataset import (
    DATASETS,
    DatasetSpec,
    Interrupted,
    convert_to_parquet,
    data_dir_for,
    download_shards,
    fetch_shard,
    list_parquet_files,
    num_row_groups,
    parquets_iter_batched,
    read_row_group_texts,
    shard_indices,
    split_files,
)
from picochat.stages.download import DownloadConfig, main, run

REPO = Path(__file__).resolve().parent.parent


def write_shard(path: Path, texts, row_group_size=2, **extra_columns):
    columns = {"text": texts, **extra_columns} if texts is not None else extra_columns
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def make_folder(folder: Path, n_files: int, docs_per_file: int = 5, row_group_size: int = 2):
    """Shards whose texts name their file and row: {folder/shard_i: [texts]}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n_files):
        texts = [f"file {i} doc {j}" for j in range(docs_per_file)]
        out[write_shard(folder / f"shard_{i:05d}.parquet", texts, row_group_size)] = texts
    return out


# ---------------------------------------------------------------------------
# Listing, splits, iteration


def test_data_dir_for(picochat_home, tmp_path):
    assert data_dir_for("fineweb-edu") == picochat_home / "base_data"
    assert data_dir_for("climbmix") == picochat_home / "base_data_climbmix"
    assert data_dir_for(str(tmp_path / "mine")) == tmp_path / "mine"


def test_listing_and_split_convention(tmp_path):
    shards = make_folder(tmp_path, 3)
    (tmp_path / "shard_00003.parquet.tmp").write_bytes(b"half a download")
    (tmp_path / "notes.txt").write_text("not data")
    names = [p.name for p in list_parquet_files(tmp_path)]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert split_files(tmp_path, "val") == [tmp_path / "shard_00002.parquet"]
    assert split_files(tmp_path, "train") == [tmp_path / "shard_00000.parquet", tmp_path / "shard_00001.parquet"]
    assert set(shards) == set(list_parquet_files(tmp_path))
    with pytest.raises(PicochatError, match="unknown split"):
        split_files(tmp_path, "test")


def test_iter_batched_start_step(tmp_path):
    # 3 files x 9 docs in row groups of 2 -> 5 row groups per file (last one holds 1 doc)
    shards = make_folder(tmp_path, 3, docs_per_file=9, row_group_size=2)
    files = list(shards)
    assert num_row_groups(files[0]) == 5
    assert read_row_group_texts(files[1], 4) == ["file 1 doc 8"]
    got = list(parquets_iter_batched("train", start=1, step=2, data_dir=tmp_path))
    # row groups 1 and 3 of files 0 and 1, in file order
    assert got == [[f"file {f} doc {2 * rg}", f"file {f} doc {2 * rg + 1}"] for f in (0, 1) for rg in (1, 3)]
    val = list(parquets_iter_batched("val", data_dir=tmp_path))
    assert [t for batch in val for t in batch] == shards[files[2]]
    assert list(parquets_iter_batched("val", start=5, data_dir=tmp_path)) == []


def test_iter_default_folder_is_fineweb_edu(picochat_home):
    make_folder(picochat_home / "base_data", 2)
    assert [t for b in parquets_iter_batched("val") for t in b] == [f"file 1 doc {j}" for j in range(5)]


def test_real_shards(pretrain_dir):
    train_file, val_file = list_parquet_files(pretrain_dir)
    assert split_files(pretrain_dir, "val") == [val_file]
    truth_train = pq.read_table(train_file).column("text").to_pylist()
    truth_val = pq.read_table(val_file).column("text").to_pylist()
    batches = list(parquets_iter_batched("train", data_dir=pretrain_dir))
    assert len(batches) == pq.ParquetFile(train_file).metadata.num_row_groups == num_row_groups(train_file)
    assert [t for b in batches for t in b] == truth_train
    assert [t for b in parquets_iter_batched("val", data_dir=pretrain_dir) for t in b] == truth_val
    # two "ranks" striding over row groups see every row group exactly once
    rank0 = list(parquets_iter_batched("train", start=0, step=2, data_dir=pretrain_dir))
    rank1 = list(parquets_iter_batched("train", start=1, step=2, data_dir=pretrain_dir))
    assert rank0 == batches[0::2] and rank1 == batches[1::2]
    assert read_row_group_texts(train_file, len(batches) - 1) == batches[-1]


def test_listing_errors(tmp_path, picochat_home):
    # picochat download fills a named dataset's folder, never a folder of the user's own
    with pytest.raises(PicochatError, match="does not exist: run `picochat download` first"):
        list_parquet_files(data_dir_for("fineweb-edu"))
    with pytest.raises(PicochatError, match=r"does not exist \(give a named dataset, fineweb-edu or climbmix, or an "
                                            r"existing folder of parquet files\)$"):
        list_parquet_files(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.parquet.tmp").write_bytes(b"")
    with pytest.raises(PicochatError, match="no .parquet files"):
        list_parquet_files(empty)
    one = tmp_path / "one"
    make_folder(one, 1)
    assert len(split_files(one, "val")) == 1
    with pytest.raises(PicochatError, match="only one parquet file"):
        split_files(one, "train")


def test_bad_parquet_errors(tmp_path):
    notext = tmp_path / "notext"
    notext.mkdir()
    write_shard(notext / "a.parquet", None, content=["x", "y"])
    write_shard(notext / "b.parquet", ["val doc"])
    with pytest.raises(PicochatError, match=r"a\.parquet: no 'text' column \(columns: content\)"):
        next(parquets_iter_batched("train", data_dir=notext))

    corrupt = tmp_path / "corrupt"
    make_folder(corrupt, 2)
    good = (corrupt / "shard_00000.parquet").read_bytes()
    (corrupt / "shard_00000.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(PicochatError, match=r"shard_00000\.parquet: not a readable parquet file"):
        next(parquets_iter_batched("train", data_dir=corrupt))
    with pytest.raises(PicochatError, match=r"shard_00000\.parquet: not a readable parquet file"):
        num_row_groups(corrupt / "shard_00000.parquet")

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(PicochatError, match="holds int64, not strings"):
        read_row_group_texts(ints, 0)


# ---------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 with scripted faults


class ShardHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/")
        srv.hits[name] += 1
        body = srv.files.get(name)
        fault = srv.faults[name].popleft() if srv.faults.get(name) else None
        if body is None or fault == 404:
            self.send_error(404)
            return
        if isinstance(fault, int):
            self.send_error(fault)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "drop":  # promise the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("PICOCHAT_DATA_URL", raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.files, srv.faults, srv.hits = {}, {}, Counter()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def serve_shards(srv, tmp_path, indices, docs=6):
    """Put real little parquet shards (3 row groups each) on the server; returns {name: bytes}."""
    src = tmp_path / "served"
    src.mkdir(exist_ok=True)
    for i in indices:
        name = f"shard_{i:05d}.parquet"
        write_shard(src / name, [f"shard {i} doc {j} " + "x" * 50 for j in range(docs)])
        srv.files[name] = (src / name).read_bytes()
    return dict(srv.files)


TINY = dict(max_shard=3, dir_name="tiny")  # shards 0, 1, 2 train + 3 val


def leftovers(folder: Path):
    return sorted(p.name for p in folder.glob("*.tmp"))


def test_download_fetches_validation_shard_and_skips_existing(server, tmp_path):
    served = serve_shards(server, tmp_path, range(4))
    spec = DatasetSpec(server.url, **TINY)
    dest = tmp_path / "dest"
    summary = download_shards(spec, dest, num_files=2, workers=2, backoff=0.01)
    assert summary == {"downloaded": ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"],
                       "skipped": []}
    assert sorted(p.name for p in dest.iterdir()) == summary["downloaded"]
    for name in summary["downloaded"]:
        assert (dest / name).read_bytes() == served[name]
    assert split_files(dest, "val") == [dest / "shard_00003.parquet"]
    assert server.hits["shard_00002.parquet"] == 0

    # a second run with more shards fetches only what is missing; existing files are untouched
    write_shard(dest / "shard_00000.parquet", ["a local file that must not be replaced"])
    mine = (dest / "shard_00000.parquet").read_bytes()
    summary = download_shards(spec, dest, num_files=-1, workers=2, backoff=0.01)
    assert summary["downloaded"] == ["shard_00002.parquet"]
    assert summary["skipped"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00003.parquet"]
    assert (dest / "shard_00000.parquet").read_bytes() == mine
    assert server.hits == Counter({n: 1 for n in served})


def test_download_recovers_from_dropped_connection_and_5xx(server, tmp_path):
    served = serve_shards(server, tmp_path, range(4))
    server.faults["shard_00000.parquet"] = deque(["drop"])
    server.faults["shard_00003.parquet"] = deque([503, "drop"])
    dest = tmp_path / "dest"
    summary = download_shards(DatasetSpec(server.url, **TINY), dest, num_files=1, backoff=0.01)
    assert summary["downloaded"] == ["shard_00000.parquet", "shard_00003.parquet"]
    assert server.hits["shard_00000.parquet"] == 2 and server.hits["shard_00003.parquet"] == 3
    assert (dest / "shard_00000.parquet").read_bytes() == served["shard_00000.parquet"]
    assert (dest / "shard_00003.parquet").read_bytes() == served["shard_00003.parquet"]
    assert leftovers(dest) == []


def test_download_404_is_not_retried(server, tmp_path):
    serve_shards(server, tmp_path, [0, 1, 2])  # no validation shard on the server
    dest = tmp_path / "dest"
    with pytest.raises(PicochatError, match=r"1 of 3 shards failed: shard_00003\.parquet: not found \(HTTP 404\): "
                                            + server.url + "shard_00003.parquet"):
        download_shards(DatasetSpec(server.url, **TINY), dest, num_files=2, backoff=0.01)
    assert server.hits["shard_00003.parquet"] == 1
    assert sorted(p.name for p in dest.iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]


@pytest.mark.parametrize("bad", ["truncated", "garbage", "no-text-column"])
def test_download_bad_file_fails_after_retries_and_leaves_nothing(server, tmp_path, capsys, bad):
    served = serve_shards(server, tmp_path, range(4))
    if bad == "truncated":
        server.files["shard_00001.parquet"] = served["shard_00001.parquet"][:-100]
    elif bad == "garbage":
        server.files["shard_00001.parquet"] = b"<html>rate limited</html>" * 40
    else:
        write_shard(tmp_path / "other.parquet", None, body=["a", "b"])
        server.files["shard_00001.parquet"] = (tmp_path / "other.parquet").read_bytes()
    dest = tmp_path / "dest"
    reason = "no 'text' column" if bad == "no-text-column" else "not a readable parquet file"
    with pytest.raises(PicochatError, match=rf"shard_00001\.parquet: failed after 5 attempts: {reason}"):
        download_shards(DatasetSpec(server.url, **TINY), dest, num_files=2, backoff=0.001)
    assert server.hits["shard_00001.parquet"] == 5
    assert sorted(p.name for p in dest.iterdir()) == ["shard_00000.parquet", "shard_00003.parquet"]
    out = capsys.readouterr().out
    assert "2 downloaded, 0 skipped (already there), 1 failed" in out


def test_interrupted_fetch_leaves_nothing(server, tmp_path):
    serve_shards(server, tmp_path, [0])
    stop = threading.Event()
    stop.set()
    final = tmp_path / "shard_00000.parquet"
    with pytest.raises(Interrupted):
        fetch_shard(server.url + "shard_00000.parquet", final, stop=stop)
    assert not final.exists() and leftovers(tmp_path) == []


def test_download_stage_with_real_spec_over_http(server, tmp_path, picochat_home, capsys):
    # the real fineweb-edu layout (val = shard_01822), pointed at our server with --base-url
    served = serve_shards(server, tmp_path, [0, 1822])
    main(["-n", "1", "-w", "2", "--base-url", server.url])
    dest = picochat_home / "base_data"
    assert sorted(p.name for p in dest.iterdir()) == ["shard_00000.parquet", "shard_01822.parquet"]
    assert (dest / "shard_01822.parquet").read_bytes() == served["shard_01822.parquet"]
    assert "2 downloaded, 0 skipped" in capsys.readouterr().out


def test_download_from_local_mirror_via_env(tmp_path, picochat_home, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for i in (0, 1, 6542):
        write_shard(mirror / f"shard_{i:05d}.parquet", [f"mirror {i}"])
    (mirror / "shard_00002.parquet").write_bytes(b"not parquet")
    monkeypatch.setenv("PICOCHAT_DATA_URL", str(mirror))
    summary = run(DownloadConfig(dataset="climbmix", num_files=2, backoff=0.001))
    dest = picochat_home / "base_data_climbmix"
    assert summary["downloaded"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for name in summary["downloaded"]:
        assert (dest / name).read_bytes() == (mirror / name).read_bytes()
    assert [t for b in parquets_iter_batched("val", data_dir=dest) for t in b] == ["mirror 6542"]
    with pytest.raises(PicochatError, match=r"shard_00002\.parquet: failed after 5 attempts"):
        run(DownloadConfig(dataset="climbmix", num_files=3, backoff=0.001))
    capsys.readouterr()
    with pytest.raises(PicochatError, match=r"2 of 2 shards failed: shard_00002\.parquet: failed after 1 attempt: "
                                            r".*\(and 1 more, listed above\)"):
        run(DownloadConfig(dataset="climbmix", num_files=4, attempts=1))
    assert f"failed shard_00003.parquet: not found: {mirror / 'shard_00003.parquet'}" in capsys.readouterr().out
    assert leftovers(dest) == [] and not (dest / "shard_00002.parquet").exists()


def test_shard_indices():
    fw, cm = DATASETS["fineweb-edu"], DATASETS["climbmix"]
    assert (fw.max_shard, cm.max_shard) == (1822, 6542)
    assert fw.shard_name(1822) == "shard_01822.parquet"
    assert shard_indices(fw, 3) == [0, 1, 2, 1822]
    assert shard_indices(fw, 0) == [1822]
    assert shard_indices(fw, -1) == list(range(1823))
    assert shard_indices(fw, 10**6) == list(range(1823))
    assert shard_indices(cm, -1) == list(range(6543))
    with pytest.raises(PicochatError, match="-n must be"):
        shard_indices(fw, -2)


def test_download_config_errors(tmp_path, picochat_home, capsys, monkeypatch):
    monkeypatch.delenv("PICOCHAT_DATA_URL", raising=False)
    with pytest.raises(PicochatError, match="only http"):
        run(DownloadConfig(base_url="ftp://example.com/data"))
    with pytest.raises(PicochatError, match="neither an http"):
        run(DownloadConfig(base_url=str(tmp_path / "no_such_mirror")))
    with pytest.raises(PicochatError, match="--workers must be"):
        run(DownloadConfig(workers=0, base_url=str(tmp_path)))
    # a folder of your own: nothing to download, said clearly
    make_folder(tmp_path / "mine", 3)
    run(DownloadConfig(dataset=str(tmp_path / "mine")))
    out = capsys.readouterr().out
    assert "nothing to download" in out and "2 training file(s)" in out and "shard_00002.parquet" in out
    with pytest.raises(PicochatError, match="does not exist") as missing:
        run(DownloadConfig(dataset=str(tmp_path / "missing")))
    assert "picochat download" not in str(missing.value)


def test_cli_help_and_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    help_ = capsys.readouterr().out
    assert "--convert" in help_ and "--docs-per-shard" in help_ and "PICOCHAT_DATA_URL" in help_
    env = {"PATH": "/usr/bin:/bin", "PICOCHAT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "picochat", "download", "--dataset", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# Converting a corpus of your own


def test_convert_jsonl_and_txt_round_trip(tmp_path, capsys):
    jsonl_docs = [f"doc {i}: naïve café 東京 \U0001f600\nsecond line" for i in range(25)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(jsonl_docs))
                                      + "\n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("First doc line one\nline two\n\n\n   \nSecond doc\n\nThird\n  indented\n\n"
                                    "Fourth\n\nFifth, no newline at end", encoding="utf-8")
    txt_docs = ["First doc line one\nline two", "Second doc", "Third\n  indented", "Fourth", "Fifth, no newline at end"]
    out = tmp_path / "out"
    main(["--convert", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--output", str(out),
          "--docs-per-shard", "7", "--val-docs", "5"])
    # 30 documents: validation = min(5, 30 // 10) = 3; training 27 = 7 + 7 + 7 + 6
    files = list_parquet_files(out)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [7, 7, 7, 6, 3]
    everything = [t for f in files for t in pq.read_table(f).column("text").to_pylist()]
    assert everything == jsonl_docs + txt_docs
    assert [t for b in parquets_iter_batched("val", data_dir=out) for t in b] == txt_docs[-3:]
    assert [t for b in parquets_iter_batched("train", data_dir=out) for t in b] == (jsonl_docs + txt_docs)[:-3]
    assert "27 training documents in 4 shard(s) and 3 validation documents" in capsys.readouterr().out


def test_convert_row_groups_of_1024(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(2500)))
    files = convert_to_parquet([src], tmp_path / "out", docs_per_shard=2100, val_docs=100)
    # 2500 docs: val = min(100, 250) = 100; train 2400 = 2100 + 300
    groups = [[pq.ParquetFile(f).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(f).num_row_groups)]
              for f in files]
    assert groups == [[1024, 1024, 52], [300], [100]]
    assert pq.ParquetFile(files[0]).schema_arrow.names == ["text"]
    # small corpus: at least one validation document even when a tenth rounds to zero
    (tmp_path / "two.txt").write_text("one\n\ntwo\n")
    files = convert_to_parquet([tmp_path / "two.txt"], tmp_path / "small")
    assert [pq.read_table(f).column("text").to_pylist() for f in files] == [["one"], ["two"]]


def test_convert_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(PicochatError, match=r"bad\.jsonl:2: not valid JSON"):
        convert_to_parquet([tmp_path / "bad.jsonl"], tmp_path / "o1")
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(PicochatError, match=r"notext\.jsonl:2: expected an object with a string \"text\" field"):
        convert_to_parquet([tmp_path / "notext.jsonl"], tmp_path / "o2")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PicochatError, match=r"cannot convert \.csv"):
        convert_to_parquet([tmp_path / "data.csv"], tmp_path / "o3")
    with pytest.raises(PicochatError, match="does not exist"):
        convert_to_parquet([tmp_path / "missing.txt"], tmp_path / "o4")
    (tmp_path / "one.txt").write_text("just one document\n")
    with pytest.raises(PicochatError, match="need at least 2"):
        convert_to_parquet([tmp_path / "one.txt"], tmp_path / "o5")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n\nx\n".encode("latin-1"))
    with pytest.raises(PicochatError, match="not UTF-8"):
        convert_to_parquet([tmp_path / "latin1.txt"], tmp_path / "o6")
    make_folder(tmp_path / "taken", 2)
    (tmp_path / "two.txt").write_text("a\n\nb\n")
    with pytest.raises(PicochatError, match="already holds parquet files"):
        convert_to_parquet([tmp_path / "two.txt"], tmp_path / "taken")
    with pytest.raises(PicochatError, match="--convert needs --output"):
        run(DownloadConfig(convert=[str(tmp_path / "two.txt")]))
    assert not any((tmp_path / f"o{i}").exists() and any((tmp_path / f"o{i}").iterdir()) for i in range(1, 7))
