"""`picochat chat-eval`: evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval
and SpellingBee (or the tasks -a names), then ChatCORE over the first five (see chat_eval).

The model is the latest checkpoint of the most trained stage (rl, then sft, then base) unless
-i/-g/-s say otherwise; a base model can be evaluated too, and a folder written by `picochat export`
(-i hf --path DIR, results under chat_eval/hf_<folder name>/). -x caps the problems per task for quick
runs, which makes the ChatCORE partial (and named so). Prints a table of the tasks and writes
$PICOCHAT_HOME/chat_eval/<source>_<model-tag>/step_<step:06d>.json, or, for a subset of the tasks
or capped problems, step_<step:06d>_<tasks>_max<N>.json (a later run of the same kind on the same
checkpoint replaces it). Runs as one process or under torchrun (problems are split across ranks).
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass

from picochat.chat_eval import CHATCORE_TASKS, TASKS, build_task, centered, chatcore, evaluate_task, format_table
from picochat.cli import HelpFormatter
from picochat.common import PicochatError, compute_cleanup, compute_init, get_base_dir, out_of_memory_hint, print0
from picochat.engine import MODEL_SOURCES, load_engine, resolve_model


@dataclass
class ChatEvalConfig:
    source: str | None = None  # base, sft, rl or hf (None: the most trained stage with a checkpoint)
    path: str | None = None  # with source hf: the exported folder
    task_name: str = ""  # "|"-separated names of chat_eval.TASKS ("" = all)
    temperature: float = 0.0
    max_new_tokens: int = 512
    num_samples: int = 1  # per generative problem: pass@num_samples
    top_k: int = 50
    batch_size: int = 8  # problems per forward pass (categorical) or per sampling batch (generative)
    model_tag: str | None = None  # None: the largest d<N> tag, else the newest
    step: int | None = None  # None: the last complete checkpoint
    max_problems: int | None = None  # per task (None: all)
    device_type: str = ""  # cuda, mps or cpu ("" = autodetect)


def task_names(c: ChatEvalConfig) -> list[str]:
    names = [n.strip() for n in c.task_name.split("|") if n.strip()] or list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise PicochatError(f"unknown task {', '.join(unknown)} for -a (choose from {'|'.join(TASKS)})")
    return list(dict.fromkeys(names))


def check_config(c: ChatEvalConfig):
    for flag, value in [("-m/--max-new-tokens", c.max_new_tokens), ("-n/--num-samples", c.num_samples),
                        ("-b/--batch-size", c.batch_size)]:
        if value < 1:
            raise PicochatError(f"{flag} must be at least 1 (got {value})")
    if c.temperature < 0 or c.top_k < 0:
        raise PicochatError(f"-t/--temperature and -k/--top-k must be >= 0 (got {c.temperature}, {c.top_k})")
    if c.max_problems is not None and c.max_problems < 1:
        raise PicochatError(f"-x/--max-problems must be at least 1 (got {c.max_problems})")


def results_name(step: int, names: list[str], max_problems: int | None) -> str:
    """step_NNNNNN.json for every task in full; a subset or a cap gets its own file, so a quick
    run never replaces a full one."""
    suffix = "" if names == list(TASKS) else "_" + "-".join(names)
    suffix += "" if max_problems is None else f"_max{max_problems}"
    return f"step_{step:06d}{suffix}.json"


def run(c: ChatEvalConfig) -> dict:
    """Evaluate one checkpoint; returns the record written to the JSON file."""
    check_config(c)
    names = task_names(c)
    source, tag, step = resolve_model(c.source, c.model_tag, c.step, c.path)
    tasks = {name: build_task(name) for name in names}  # a task whose data cannot be had fails before any work
    rt = compute_init(c.device_type)
    try:
        engine, meta = load_engine(source, rt.device, rt.dtype, tag, step, c.path)
        print0(f"evaluating {source} model {tag} step {step} on {rt.device} ({rt.dtype})")
        results = {}
        for name, task in tasks.items():
            with out_of_memory_hint("-b/--batch-size", c.batch_size, f"in {name}"):
                r = evaluate_task(task, engine.model, engine.tokenizer, engine, rt.device, c.batch_size,
                                  c.num_samples, c.max_new_tokens, c.temperature, c.top_k, c.max_problems)
            results[name] = {**r, "eval_type": task.eval_type, "baseline": TASKS[name].baseline,
                             "centered": centered(r["accuracy"], TASKS[name].baseline)}
            print0(f"{name:<14} {task.eval_type:<11} accuracy {r['accuracy']:.4f} ({r['correct']}/{r['total']}) "
                   f"in {r['seconds']:.1f}s")
        capped = any(results[n]["total"] < results[n]["task_size"] for n in CHATCORE_TASKS if n in results)
        metric = chatcore(results, capped)
        print0("\n" + format_table(results, metric))
        record = {"source": source, "model_tag": tag, "step": step, "tasks": results}
        if metric:
            name, key, value = metric
            record.update(metric_name=name, metric_key=key, metric=value, chatcore=value if key == "chatcore" else None)
        record.update(config=asdict(c), model_config=meta.get("model_config"))
        if rt.master:
            out_dir = get_base_dir() / "chat_eval" / f"{source}_{tag}"
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / results_name(step, names, c.max_problems)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, path)  # a reader never sees half a file
            print0(f"results written to {path}")
        return record
    finally:
        compute_cleanup()


def main(argv=None):
    d = ChatEvalConfig()
    p = argparse.ArgumentParser(prog="picochat chat-eval", formatter_class=HelpFormatter,
                                description="Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, SpellingBee and "
                                            "ChatCORE. Results go to $PICOCHAT_HOME/chat_eval/<source>_<model-tag>/.")
    p.add_argument("-i", "--source", default=d.source, choices=MODEL_SOURCES,
                   help="checkpoint stage: base, sft or rl (if not given: the most trained one there is), or hf: "
                        "a folder written by picochat export, given by --path")
    p.add_argument("--path", default=d.path, help="with -i hf: the exported model folder")
    p.add_argument("-a", "--task-name", default=d.task_name,
                   help=f"tasks separated by '|', from {'|'.join(TASKS)}; fewer than the ChatCORE five give a "
                        "partial ChatCORE (if not given: all)")
    p.add_argument("-t", "--temperature", type=float, default=d.temperature,
                   help="sampling temperature of generative tasks (0 = greedy)")
    p.add_argument("-m", "--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="longest completion of a generative problem, in tokens")
    p.add_argument("-n", "--num-samples", type=int, default=d.num_samples,
                   help="completions per generative problem; it passes if any does (pass@n)")
    p.add_argument("-k", "--top-k", type=int, default=d.top_k, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("-b", "--batch-size", type=int, default=d.batch_size,
                   help="problems evaluated together: per forward pass (categorical tasks), or per sampling "
                        "batch of batch-size x num-samples rows (generative tasks; one row per problem at "
                        "temperature 0). Generative scores can shift slightly with it (rounding, and samples "
                        "drawn per batch); 1 evaluates each problem alone, as the reference does")
    p.add_argument("-g", "--model-tag", default=d.model_tag, help="checkpoint folder (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=d.step, help="checkpoint step (default: the last one)")
    p.add_argument("-x", "--max-problems", type=int, default=d.max_problems,
                   help="evaluate only the first this many problems of each task, for quick runs (default: all)")
    p.add_argument("--device-type", default=d.device_type, help="cuda, mps or cpu (if not given: autodetect)")
    run(ChatEvalConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    from picochat import cli

    cli.run(main)
