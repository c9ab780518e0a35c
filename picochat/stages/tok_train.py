"""`picochat tok-train`: train the BPE tokenizer on the pretraining data's train split (documents
in order, each cut to --doc-cap characters, until more than --max-chars characters in all) and
save it to $PICOCHAT_HOME/tokenizer."""

import argparse
import time
from dataclasses import dataclass

from tqdm import tqdm

from picochat.common import PicochatError, get_rank, print0
from picochat.dataset import DEFAULT_DATASET, data_dir_for, parquets_iter_batched
from picochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer, get_tokenizer_dir

# Round-trip check after training: English, numbers, contractions, symbols, CJK, emoji, odd whitespace.
SANITY_TEXT = ("The quick brown fox doesn't jump; it'll wait. We've got 3 foxes, 1234567 hens and 3.14159 eggs.\n"
               "Symbols: @#$%^&*()[]{}<>~`|\\/ +-=_ \"quotes\" 'single'\n"
               "\t  indented\r\n\n"
               "中文：你好，世界！日本語のテキスト。한국어 문장입니다.\n"
               "Emoji: 🚀🌍👍🏽 👨‍👩‍👧 café naïve Ωμέγα\n")


@dataclass
class TokTrainConfig:
    max_chars: int = 2_000_000_000
    doc_cap: int = 10_000
    vocab_size: int = 32768
    dataset: str = DEFAULT_DATASET


def training_texts(config: TokTrainConfig):
    """Documents of the train split, each cut to doc_cap characters, until the total exceeds max_chars:
    the document that crosses it is kept whole (up to doc_cap), as the reference does, so the same
    flags on the same text give the same merges."""
    data_dir = data_dir_for(config.dataset)
    seen = 0
    for batch in parquets_iter_batched("train", data_dir=data_dir):
        for doc in batch:
            doc = doc[:config.doc_cap]
            seen += len(doc)
            yield doc
            if seen > config.max_chars:
                return


def count(text: str) -> int:
    """An integer flag that also accepts scientific notation, e.g. 2e9."""
    try:
        return int(text) if text.lstrip("-").isdigit() else int(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def run(config: TokTrainConfig) -> Tokenizer:
    if config.vocab_size < MIN_VOCAB_SIZE:
        raise PicochatError(f"--vocab-size {config.vocab_size} is too small (minimum {MIN_VOCAB_SIZE}: "
                            "256 byte tokens + 9 special tokens)")
    if config.max_chars <= 0 or config.doc_cap <= 0:
        raise PicochatError("--max-chars and --doc-cap must be positive")
    # fail on a missing or malformed dataset before starting the clock
    if next(parquets_iter_batched("train", data_dir=data_dir_for(config.dataset)), None) is None:
        raise PicochatError(f"the train split of {config.dataset} has no rows")

    print0(f"training a {config.vocab_size}-token BPE on about {config.max_chars:,} characters of "
           f"{config.dataset} (documents cut to {config.doc_cap:,} characters)")
    chars = 0

    def counted(docs):
        nonlocal chars
        for doc in docs:
            chars += len(doc)
            progress.update(len(doc))
            yield doc

    t0 = time.time()
    with tqdm(total=config.max_chars, unit="char", unit_scale=True, desc="tok-train",
              disable=get_rank() != 0) as progress:
        tokenizer = Tokenizer.train_from_iterator(counted(training_texts(config)), config.vocab_size)
    elapsed = time.time() - t0
    print0(f"trained on {chars:,} characters in {elapsed:.1f}s ({chars / elapsed:,.0f} chars/s)")

    decoded = tokenizer.decode(tokenizer.encode(SANITY_TEXT))
    if decoded != SANITY_TEXT:
        raise RuntimeError(f"tokenizer round trip failed: {SANITY_TEXT!r} came back as {decoded!r}")

    out_dir = get_tokenizer_dir()
    tokenizer.save(out_dir)
    token_bytes = tokenizer.token_bytes()
    entries = token_bytes[token_bytes > 0].float()
    # the length of the vocabulary's entries, not compression (tok-eval measures that on text)
    print0(f"saved {out_dir / 'tokenizer.pkl'} and {out_dir / 'token_bytes.pt'} (vocab {tokenizer.get_vocab_size()}; "
           f"length of the non-special vocabulary entries in bytes: min {int(entries.min())}, "
           f"max {int(entries.max())}, mean {entries.mean():.2f})")
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="picochat tok-train",
        description="Train the BPE tokenizer on the pretraining data's train "
                    "split (documents in order, each cut to --doc-cap characters, until more than "
                    "--max-chars characters in all) and save it to $PICOCHAT_HOME/tokenizer.")
    parser.add_argument("--max-chars", type=count, default=TokTrainConfig.max_chars,
                        help="train on the train split's documents until just past this many characters "
                             "(default: %(default)s)")
    parser.add_argument("--doc-cap", type=int, default=TokTrainConfig.doc_cap,
                        help="cut each document to this many characters (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=TokTrainConfig.vocab_size,
                        help="total vocabulary size, 9 special tokens included (default: %(default)s)")
    parser.add_argument("--dataset", default=TokTrainConfig.dataset,
                        help="fineweb-edu, climbmix, or the path of a folder of parquet files (default: %(default)s)")
    run(TokTrainConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
