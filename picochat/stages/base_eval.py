"""`picochat base-eval`: evaluate a base-model checkpoint. Any subset of
- sample: greedy continuations of fixed prompts and a few unconditional samples (rank 0)
- bpb:    bits per byte on the train and val splits of the pretraining data
- core:   the CORE metric (see core_eval), or a partial CORE over --tasks

The model is a base checkpoint, or with --path a folder written by `picochat export` (results
under base_eval/hf_<folder name>/). Results go to $PICOCHAT_HOME/base_eval/<model-tag>/:
  base_model_<step:06d>.csv   CORE table: "Task, Accuracy, Centered" rows, then the CORE row
                              (labelled "CORE (partial: ...)" when tasks were left out or capped)
  base_model_<step:06d>.json  everything measured; a later run on the same checkpoint updates
                              the sections it recomputes (core, bpb, samples) and keeps the rest
Runs as one process or under torchrun (CORE examples and bpb batches are split across ranks).
"""

import argparse
import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass

from picochat import checkpoint
from picochat.cli import HelpFormatter
from picochat.common import PicochatError, compute_cleanup, compute_init, get_base_dir, out_of_memory_hint, print0
from picochat.core_eval import BATCH_TOKENS, evaluate_core, format_table, load_bundle, load_tasks, select_tasks
from picochat.dataloader import DataLoader
from picochat.dataset import DEFAULT_DATASET
from picochat.export import folder_step, load_folder
from picochat.loss_eval import evaluate_bpb
from picochat.sampling import sample_completions, sample_unconditional

EVALS = ("core", "bpb", "sample")
def write_core_csv(result: dict, path):
    """The reference's layout: "Task, Accuracy, Centered" columns padded for reading, one row per
    task, then the CORE row. A partial CORE's label has commas, so the csv module quotes it;
    readers strip the padding."""
    rows = [("Task", "Accuracy", "Centered")]
    rows += [(label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}") for label, r in result["tasks"].items()]
    rows.append((result["metric_name"], "", f"{result['metric']:.6f}"))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for task, accuracy, centered in rows:
        writer.writerow([f"{task:<35}", f" {accuracy:<10}", f" {centered:<10}"])
    _write_text(path, buf.getvalue())


def _write_text(path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class BaseEvalConfig:
    eval: str = "core,bpb,sample"  # comma-separated subset of EVALS
    model_tag: str | None = None  # None: the largest d<N> tag, else the newest
    step: int | None = None  # None: the last complete checkpoint
    path: str | None = None  # an exported folder instead of a checkpoint
    max_per_task: int = -1  # CORE examples per task (-1 = all)
    tasks: str = ""  # comma-separated CORE task labels ("" = all 22)
    core_batch_tokens: int = BATCH_TOKENS  # CORE: padded tokens per forward pass
    device_batch_size: int = 32  # bpb rows per forward pass
    split_tokens: int = 40 * 524288  # bpb tokens per split
    dataset: str = DEFAULT_DATASET  # bpb data: a named dataset or a folder of parquet shards
    device_type: str = ""  # cuda | mps | cpu ("" = autodetect)
    num_samples: int = 8  # unconditional samples


def check_config(c: BaseEvalConfig) -> list[str]:
    evals = [e.strip() for e in c.eval.split(",") if e.strip()]
    bad = [e for e in evals if e not in EVALS]
    if bad or not evals:
        raise PicochatError(f"--eval takes a comma-separated subset of {', '.join(EVALS)} (got {c.eval!r})")
    for name, value in [("--core-batch-tokens", c.core_batch_tokens), ("--device-batch-size", c.device_batch_size),
                        ("--split-tokens", c.split_tokens)]:
        if value < 1:
            raise PicochatError(f"{name} must be at least 1 (got {value})")
    if c.max_per_task == 0 or c.max_per_task < -1:
        raise PicochatError(f"--max-per-task must be positive, or -1 for all examples (got {c.max_per_task})")
    return evals


def run(c: BaseEvalConfig) -> dict:
    """Evaluate one checkpoint; returns the record written to the JSON file."""
    evals = check_config(c)
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()] or None
    if "core" in evals:  # a missing task file or unknown label fails now, not after the other evals
        select_tasks(load_tasks(load_bundle()), tasks)
    rt = compute_init(c.device_type)
    try:
        if c.path is not None:
            if c.model_tag is not None or c.step is not None:
                raise PicochatError("--model-tag and --step pick a checkpoint in $PICOCHAT_HOME; --path is the model")
            name, step = folder_step(c.path)
            tag = f"hf_{name}"
            model, tokenizer, meta = load_folder(c.path, rt.device, rt.dtype)
        else:
            ckpt_dir, step = checkpoint.resolve_checkpoint("base", c.model_tag, c.step)
            tag = ckpt_dir.name
            model, tokenizer, meta = checkpoint.load_model("base", rt.device, rt.dtype, tag, step)
        print0(model.attention_summary())
        print0(f"evaluating base model {tag} step {step} on {rt.device} ({rt.dtype})")
        record = {"model_tag": tag, "step": step}

        if "sample" in evals and rt.master:
            completions = sample_completions(model, tokenizer)
            unconditional = sample_unconditional(model, tokenizer, c.num_samples)
            print0("\nconditioned samples (greedy):")
            for prompt, completion in completions:
                print0(f"{prompt!r} -> {completion!r}")
            print0("\nunconditioned samples (temperature 1.0):")
            for text in unconditional:
                print0(f"{text!r}")
            record["samples"] = {"conditioned": [p + s for p, s in completions], "unconditioned": unconditional}

        if "bpb" in evals:
            T = model.config.sequence_len
            tokens_per_step = c.device_batch_size * T * rt.world_size
            steps = c.split_tokens // tokens_per_step
            if steps == 0:
                raise PicochatError(f"--split-tokens {c.split_tokens} is less than one step of --device-batch-size "
                                    f"{c.device_batch_size} x {T} tokens x {rt.world_size} ranks = {tokens_per_step}")
            token_bytes = tokenizer.token_bytes().to(rt.device)
            record["bpb"] = {"split_tokens": steps * tokens_per_step, "dataset": c.dataset}
            for split in ("train", "val"):
                loader = DataLoader(tokenizer, c.device_batch_size, T, split, c.dataset, rt.device)
                t0 = time.time()
                with out_of_memory_hint("--device-batch-size", c.device_batch_size, f"in {split} bpb"):
                    bpb = evaluate_bpb(model, loader, steps, token_bytes)
                record["bpb"][split] = bpb
                print0(f"{split} bpb: {bpb:.6f} ({steps * tokens_per_step:,} tokens in {time.time() - t0:.1f}s)")

        if "core" in evals:
            with out_of_memory_hint("--core-batch-tokens", c.core_batch_tokens, "in the CORE evaluation"):
                result = evaluate_core(model, tokenizer, rt.device, c.max_per_task, tasks, c.core_batch_tokens)
            print0("\n" + format_table(result))
            print0(f"{result['examples']} examples in {result['seconds']:.1f}s "
                   f"({result['examples_per_s']:.1f} examples/s)")
            record["core"] = result

        if rt.master:
            out_dir = get_base_dir() / "base_eval" / tag
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = f"base_model_{step:06d}"
            if "core" in record:
                write_core_csv(record["core"], out_dir / f"{stem}.csv")
            json_path = out_dir / f"{stem}.json"
            saved = json.loads(json_path.read_text()) if json_path.exists() else {}
            saved.update(record, config=asdict(c), model_config=meta.get("model_config"))
            _write_text(json_path, json.dumps(saved, indent=2) + "\n")
            print0(f"results written to {json_path}")
        return record
    finally:
        compute_cleanup()


def main(argv=None):
    d = BaseEvalConfig()
    p = argparse.ArgumentParser(prog="picochat base-eval", description="Evaluate a base model: CORE, bits per "
                                "byte, samples. Results go to $PICOCHAT_HOME/base_eval/<model-tag>/.",
                                formatter_class=HelpFormatter)
    p.add_argument("--eval", default=d.eval, help=f"comma-separated subset of {','.join(EVALS)}")
    p.add_argument("--model-tag", default=d.model_tag, help="checkpoint folder (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=d.step, help="checkpoint step (default: the last one)")
    p.add_argument("--path", default=d.path, help="evaluate a folder written by picochat export instead of a "
                   "checkpoint (results under base_eval/hf_<folder name>/)")
    p.add_argument("--max-per-task", type=int, default=d.max_per_task,
                   help="CORE examples per task, for quick runs (-1 = all)")
    p.add_argument("--tasks", default=d.tasks,
                   help="comma-separated CORE task labels; fewer than all gives a partial CORE (default: all)")
    p.add_argument("--core-batch-tokens", type=int, default=d.core_batch_tokens,
                   help="CORE: padded tokens per forward pass; examples are grouped up to this "
                        "(1 = one example per forward, as the reference)")
    p.add_argument("--device-batch-size", type=int, default=d.device_batch_size, help="bpb rows per forward pass")
    p.add_argument("--split-tokens", type=int, default=d.split_tokens,
                   help="bpb tokens per split, rounded down to a multiple of device batch x seq len x ranks")
    p.add_argument("--dataset", default=d.dataset,
                   help="bpb data: fineweb-edu, climbmix or a folder of parquet shards")
    p.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu ('' = autodetect)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="unconditional samples to print")
    args = p.parse_args(argv)
    run(BaseEvalConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()}))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
