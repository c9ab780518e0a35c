"""`picochat export`: write a checkpoint as a Hugging Face folder (safetensors, config, modeling
code, tokenizer with the chat template, model card) that transformers loads without picochat:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder)

picochat/export.py says what the folder holds; `-i hf --path folder` loads it back into picochat's
chat-cli, chat-web and chat-eval."""

import argparse
from dataclasses import dataclass

import torch

from picochat import checkpoint as ckpt
from picochat.cli import HelpFormatter
from picochat.common import PicochatError, get_base_dir
from picochat.export import DEFAULT_SHARD_BYTES, DTYPES, export_model, stock_nanochat_note


@dataclass
class ExportConfig:
    source: str | None = None  # base | sft | rl (None: the most trained stage there is)
    model_tag: str | None = None
    step: int | None = None
    output: str | None = None  # None: $PICOCHAT_HOME/hf/<source>_<tag>_step<step>
    dtype: str = "bf16"
    max_shard_mb: float = DEFAULT_SHARD_BYTES / 2**20
    force: bool = False


def run(c: ExportConfig):
    if c.dtype not in DTYPES:
        raise PicochatError(f"--dtype takes {' or '.join(DTYPES)}, not {c.dtype!r}")
    if c.max_shard_mb <= 0:
        raise PicochatError(f"--max-shard-mb must be positive, got {c.max_shard_mb}")
    source = ckpt.pick_source(c.source)
    ckpt_dir, step = ckpt.resolve_checkpoint(source, c.model_tag, c.step)
    tag = ckpt_dir.name
    # fp32 on the CPU holds every stored weight exactly (bf16 embeddings included); the export casts once
    model, tokenizer, meta = ckpt.load_model(source, torch.device("cpu"), torch.float32, tag, step)
    out = get_base_dir() / "hf" / f"{source}_{tag}_step{step}" if c.output is None else c.output
    folder = export_model(model, tokenizer, meta, {"source": source, "model_tag": tag, "step": step}, out,
                          DTYPES[c.dtype], int(c.max_shard_mb * 2**20), c.force, get_base_dir())
    print(f"exported {source} model {tag} step {step} ({c.dtype}) to {folder}")
    print(stock_nanochat_note(model))
    print(f"load it in transformers: AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)")
    print(f"or back in picochat:     picochat chat-cli -i hf --path {folder}")
    return folder


def main(argv=None):
    d = ExportConfig()
    p = argparse.ArgumentParser(prog="picochat export", formatter_class=HelpFormatter,
                                description="Write a checkpoint as a Hugging Face folder that transformers loads "
                                            "(trust_remote_code=True) with no picochat installed.")
    p.add_argument("-i", "--source", default=d.source, choices=ckpt.SOURCES,
                   help="checkpoint stage: base, sft or rl (if not given: the most trained one there is)")
    p.add_argument("-g", "--model-tag", default=d.model_tag,
                   help="checkpoint tag, e.g. d20 (if not given: the largest d<N> tag, else the newest)")
    p.add_argument("-s", "--step", type=int, default=d.step, help="checkpoint step (if not given: the last)")
    p.add_argument("-o", "--output", default=d.output,
                   help="folder to write (if not given: $PICOCHAT_HOME/hf/<source>_<tag>_step<step>)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help="weight precision in the files: bf16 halves them, fp32 keeps every trained bit")
    p.add_argument("--max-shard-mb", type=float, default=d.max_shard_mb,
                   help="largest weights file, in MiB; bigger models are split into several files with an index")
    p.add_argument("--force", action="store_true",
                   help="replace --output if it is an earlier export (never a folder holding other files)")
    run(ExportConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
