"""`picochat download`: fetch pretraining shards (the validation shard always comes too), check a
folder of your own, or convert your own text into parquet shards. The data format is described
in picochat/dataset.py."""

import argparse
from dataclasses import dataclass, field

from picochat.common import PicochatError
from picochat.dataset import (
    DATASETS,
    DEFAULT_DATASET,
    convert_to_parquet,
    data_dir_for,
    download_shards,
    list_parquet_files,
    open_parquet,
)


@dataclass
class DownloadConfig:
    dataset: str = DEFAULT_DATASET  # a name in DATASETS or the path of your own folder
    num_files: int = -1  # training shards to fetch (-1 = all); the validation shard always comes too
    workers: int = 4
    base_url: str = ""  # "" = $PICOCHAT_DATA_URL, else the dataset's own host
    attempts: int = 5
    backoff: float = 2.0  # seconds before the second attempt, doubling after each failure
    timeout: float = 30.0  # seconds without data before an attempt fails
    convert: list[str] = field(default_factory=list)  # .jsonl/.txt files to turn into parquet shards
    output: str = ""
    docs_per_shard: int = 65536
    val_docs: int = 8192


def run(config: DownloadConfig):
    if config.convert:
        if not config.output:
            raise PicochatError("--convert needs --output DIR (the folder to write the parquet shards to)")
        return convert_to_parquet(config.convert, config.output, config.docs_per_shard, config.val_docs)
    if config.output:
        raise PicochatError("--output is only used with --convert")
    data_dir = data_dir_for(config.dataset)
    if config.dataset not in DATASETS:
        files = list_parquet_files(data_dir)
        for path in files:
            open_parquet(path)
        train = f"{len(files) - 1} training file(s)" if len(files) > 1 else "no training files (need 2+ files)"
        print(f"{data_dir} is your own data folder, so there is nothing to download: {train}, "
              f"validation = {files[-1].name}", flush=True)
        return None
    return download_shards(DATASETS[config.dataset], data_dir, config.num_files, config.workers, config.base_url,
                           config.attempts, config.backoff, config.timeout)


def main(argv=None):
    d = DownloadConfig()
    parser = argparse.ArgumentParser(
        prog="picochat download",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download pretraining shards (the last shard, the validation split, always comes too), or\n"
                    "convert your own text into parquet shards.",
        epilog="examples:\n"
               "  picochat download -n 8                  # shards 0-7 + shard_01822 (val) of fineweb-edu\n"
               "  picochat download -n 170 --dataset climbmix -w 8\n"
               "  PICOCHAT_DATA_URL=/mnt/mirror picochat download -n 8   # copy from a local mirror\n"
               "  picochat download --convert a.jsonl b.txt --output ~/mydata\n"
               "\n"
               "data format: a folder of *.parquet files with a string column 'text' (one document per row);\n"
               "files are taken in name order and the LAST file is the validation split.\n"
               ".jsonl input: one JSON object per line with a \"text\" field. .txt input: documents separated\n"
               "by blank lines. Shards have row groups of 1024 rows.")
    parser.add_argument("-n", "--num-files", type=int, default=d.num_files,
                        help=f"number of training shards to download, 0..N-1 (-1 = all; default: {d.num_files})")
    parser.add_argument("-w", "--workers", type=int, default=d.workers,
                        help=f"parallel downloads (default: {d.workers})")
    parser.add_argument("--dataset", default=d.dataset,
                        help=f"{' or '.join(DATASETS)} (saved under $PICOCHAT_HOME), or a folder of your own "
                             f"parquet files (nothing to download) (default: {d.dataset})")
    parser.add_argument("--base-url", default=d.base_url,
                        help="fetch shards from this http(s) URL or local folder with the same file names "
                             "(default: $PICOCHAT_DATA_URL, else the dataset's host)")
    parser.add_argument("--attempts", type=int, default=d.attempts,
                        help=f"tries per shard before giving up (default: {d.attempts})")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help=f"seconds without data before a try fails (default: {d.timeout:g})")
    parser.add_argument("--convert", nargs="+", metavar="FILE", default=[],
                        help="convert these .jsonl/.txt files into parquet shards in --output instead of downloading")
    parser.add_argument("--output", default=d.output, help="with --convert: the new folder to write shards to")
    parser.add_argument("--docs-per-shard", type=int, default=d.docs_per_shard,
                        help=f"with --convert: documents per training shard (default: {d.docs_per_shard})")
    parser.add_argument("--val-docs", type=int, default=d.val_docs,
                        help="with --convert: documents in the last (validation) shard, at most a tenth of "
                             f"the corpus (default: {d.val_docs})")
    run(DownloadConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
