"""The run report: one markdown file gathering what the stages wrote under $PICOCHAT_HOME (checkpoint
metas, metrics.jsonl, tok-eval's table, base-eval's and chat-eval's results), with PNG plots drawn
from the metrics. `picochat report` writes it; everything here only reads.

A stage that did not run is reported as not run, never as a zero. A metric is printed under the
name its stage gave it (a capped or partial CORE/ChatCORE keeps its partial name). Plots need
matplotlib (the `report` extra); without it the report says so and has none.
"""

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.common import environment as common_environment
from picochat.gpt import GPT

GPU_HOUR_USD = 3.0  # the reference's cost estimate: an 8xH100 node at about $24/h
GPT2_CORE = 0.256525  # the leaderboard's bar: GPT-2 (1.5B)'s CORE
STAGES = {"base": "base-train", "sft": "chat-sft", "rl": "chat-rl"}


@dataclass
class StageRun:
    stage: str  # base, sft or rl
    tag: str
    step: int
    meta: dict
    metrics: list[dict]  # metrics.jsonl, in order


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def find_run(stage: str, tag: str | None = None) -> StageRun | None:
    """The stage's run under `tag` (None: the latest tag) at its last complete checkpoint."""
    tag = tag or ckpt.find_latest_tag(stage)
    if tag is None:
        return None
    folder = ckpt.checkpoint_dir(stage, tag)
    step = ckpt.find_last_step(folder)
    if step is None:
        return None
    return StageRun(stage, tag, step, ckpt.load_meta(folder, step), read_jsonl(folder / "metrics.jsonl"))


def training_records(run: StageRun) -> list[dict]:
    """Training-step lines (evaluation lines have no "loss"), up to the checkpoint's step."""
    return [r for r in run.metrics if "loss" in r and r["step"] < run.step]


def eval_records(run: StageRun, key: str) -> list[dict]:
    """Evaluation lines up to the checkpoint's step (a killed run may have logged later ones)."""
    return [r for r in run.metrics if key in r and r[key] is not None and r["step"] <= run.step]


def model_summary(model_config: dict) -> dict | None:
    """Parameter counts and training FLOPs per token of a checkpoint's model (built on the meta
    device: nothing is allocated); None for a model this version cannot build."""
    try:
        with torch.device("meta"):
            model = GPT(ckpt.config_from_meta({"model_config": model_config}), torch.float32)
    except (PicochatError, TypeError, ValueError):
        return None
    return {"params": model.num_scaling_params(), "flops_per_token": model.estimate_flops()}


def environment() -> dict:
    """The machine writing the report (the training machine's is in the base meta, when saved)."""
    here = common_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        here["device"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return here


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} s ({value / 3600:.2f} h)"


def training_summary(run: StageRun, gpu_hour_usd: float = GPU_HOUR_USD) -> dict:
    """What a training run's checkpoint and metrics say about its time and size, as printed."""
    steps = training_records(run)
    loop = run.meta.get("loop_state", {})
    world = run.meta.get("world_size", 1)
    out = {"steps": f"{run.step:,}", "processes": str(world),
           "time in steps (sum of dt)": seconds(sum(r["dt"] for r in steps)) if steps else "n/a (no metrics)"}
    if run.stage == "base":
        fp8 = run.meta.get("user_config", {}).get("fp8")
        out["matmul precision"] = ("fp8 (--fp8), evaluations in the compute dtype" if fp8
                                   else run.meta.get("compute_dtype", "n/a").removeprefix("torch."))
        clock = loop.get("total_training_time")
        out["training time (leaderboard clock: the steps after step 10)"] = seconds(clock)
        out["tokens trained"] = f"{steps[-1]['tokens']:,}" if steps else "n/a"
        out["training FLOPs"] = f"{steps[-1]['flops']:.3e}" if steps and steps[-1].get("flops") else "n/a"
        mfus = [r["bf16_mfu"] for r in steps if r.get("bf16_mfu") is not None]
        out["mean bf16 MFU"] = f"{sum(mfus) / len(mfus):.2f}%" if mfus else "n/a (no known peak FLOP/s: a CPU?)"
        # a GPU-hour price: meaningless where the peak, and so the device, is unknown
        price = "the reference's H100 price" if gpu_hour_usd == GPU_HOUR_USD else "as given"
        out["cost estimate (that clock)"] = (f"${clock / 3600 * world * gpu_hour_usd:,.2f} ({world} GPU(s) at "
                                             f"${gpu_hour_usd:g}/GPU-hour, {price})"
                                             if mfus and clock is not None else "n/a")
    if run.stage in ("base", "sft"):  # SFT's is over its own validation mixture's assistant tokens
        out["val bpb (last)"] = fmt(loop.get("val_bpb"))
        out["val bpb (min)"] = fmt(loop.get("min_val_bpb"))
    return out


def step_results(folder: Path, prefix: str, run: StageRun) -> dict | None:
    """What was evaluated on the run's checkpoint: the files of its step written after it (older
    ones are of an earlier run of the tag, since overwritten), the full run's file first, then the
    newest. Tasks merge across files, each from the first file that has it; the headline metric is
    the first file's, under the name it was given."""
    meta_time = ckpt.meta_path(ckpt.checkpoint_dir(run.stage, run.tag), run.step).stat().st_mtime
    full = f"{prefix}{run.step:06d}.json"
    files = [p for p in folder.glob(f"{prefix}{run.step:06d}*.json") if p.stat().st_mtime >= meta_time]
    if not files:
        return None
    files.sort(key=lambda p: (p.name != full, -p.stat().st_mtime))
    results = [json.loads(p.read_text()) for p in files]
    merged = {**results[0], "tasks": {}}
    for result in results:
        for name, task in result.get("tasks", {}).items():
            merged["tasks"].setdefault(name, task)
    return merged


def core_lines(home: Path, base: StageRun | None) -> list[str]:
    result = None if base is None else step_results(home / "base_eval" / base.tag, "base_model_", base)
    if result is None or "core" not in result:
        return ["base-eval (CORE) not run for this checkpoint."]
    core = result["core"]
    rows = [[label, fmt(r["accuracy"]), fmt(r["centered"]), r["examples"]] for label, r in core["tasks"].items()]
    rows.append([f"**{core['metric_name']}**", "", f"**{fmt(core['metric'])}**", core["examples"]])
    lines = table(["task", "accuracy", "centered", "examples"], rows)
    if "bpb" in result:
        lines += ["", f"bits per byte: train {fmt(result['bpb'].get('train'))}, val {fmt(result['bpb'].get('val'))} "
                      f"({fmt(result['bpb'].get('split_tokens'))} tokens per split)"]
    return lines


def leaderboard(home: Path, base: StageRun | None) -> str:
    """The speedrun's verdict: the leaderboard clock and whether the full CORE beat GPT-2's. A partial
    or capped CORE gets no verdict: it is not the number the bar refers to."""
    if base is None:
        return "leaderboard: no base-train run."
    clock = base.meta.get("loop_state", {}).get("total_training_time")
    line = f"leaderboard time (base-train's steps after step 10): {seconds(clock)}"
    result = step_results(home / "base_eval" / base.tag, "base_model_", base)
    core = (result or {}).get("core")
    if core is None:
        return line + "; base-eval (CORE) not run: no verdict."
    if core.get("core") is None:
        return line + f"; {core['metric_name']}: {fmt(core['metric'])}, not the full CORE: no verdict."
    verdict = "beats" if core["core"] > GPT2_CORE else "does not beat"
    return line + f"; CORE {fmt(core['core'])}, which {verdict} GPT-2's {GPT2_CORE}."


def chat_eval_lines(home: Path, runs: dict) -> list[str]:
    """Per task, per stage: the accuracy chat-eval wrote for each stage's checkpoint."""
    results = {}
    for stage, run in runs.items():
        if run is not None:
            result = step_results(home / "chat_eval" / f"{stage}_{run.tag}", "step_", run)
            if result is not None:
                results[stage] = result
    if not results:
        return ["chat-eval not run."]
    tasks = list(dict.fromkeys(name for r in results.values() for name in r["tasks"]))
    rows = [[name] + [fmt(results[s]["tasks"][name]["accuracy"]) if s in results and name in results[s]["tasks"]
                      else "not run" for s in runs] for name in tasks]
    # each stage's ChatCORE under its own name (a partial one says so)
    rows.append(["ChatCORE (name as reported)"] + [f"{results[s]['metric_name']}: {fmt(results[s]['metric'])}"
                                                   if s in results and "metric" in results[s] else "n/a"
                                                   for s in runs])
    return table(["task"] + [f"{s} ({'not run' if s not in results else 'step ' + str(results[s]['step'])})"
                             for s in runs], rows)


# ---------------------------------------------------------------------------
# Plots


def plot_specs(runs: dict) -> list[tuple[str, str, list]]:
    """(file name, title, [(x label, y label, [(series label, xs, ys)])]) per figure, for the runs that ran."""
    specs = []
    base = runs.get("base")
    if base is not None:
        train = training_records(base)
        bpb = eval_records(base, "val_bpb")
        totals = {0: {"tokens": 0, "flops": 0}} | {r["step"] + 1: r for r in train}
        panels_loss, panels_bpb = [], []
        at = lambda x, step: step if x == "step" else totals[step][x]
        for x in ("step", "tokens", "flops"):
            # a step's loss is measured before its own update, an eval at step s after s updates:
            # both at the totals of the step before
            for panels, records, key, label in ((panels_loss, train, "loss", "train loss"),
                                                (panels_bpb, bpb, "val_bpb", "val bpb")):
                points = [(at(x, r["step"]), r[key]) for r in records if x == "step" or r["step"] in totals]
                panels.append((x, key.replace("_", " "), [(label, [p[0] for p in points], [p[1] for p in points])]))
        specs.append(("base_loss.png", "base-train: training loss", panels_loss))
        specs.append(("base_val_bpb.png", "base-train: validation bits per byte", panels_bpb))
        mfu = [r for r in train if r.get("bf16_mfu") is not None]
        specs.append(("base_speed.png", "base-train: throughput",
                      [("step", "tok/s", [("tok/s", [r["step"] for r in train], [r["tok_per_s"] for r in train])]),
                       ("step", "bf16 MFU %", [("MFU", [r["step"] for r in mfu], [r["bf16_mfu"] for r in mfu])])]))
    sft = runs.get("sft")
    if sft is not None:
        train, bpb = training_records(sft), eval_records(sft, "val_bpb")
        specs.append(("sft.png", "chat-sft: loss and val bpb",
                      [("step", "loss", [("train loss", [r["step"] for r in train], [r["loss"] for r in train])]),
                       ("step", "val bpb", [("val bpb", [r["step"] for r in bpb], [r["val_bpb"] for r in bpb])])]))
    rl = runs.get("rl")
    if rl is not None:
        train, evals = training_records(rl), eval_records(rl, "pass@1")
        ks = sorted({k for r in evals for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        specs.append(("rl.png", "chat-rl: reward and pass@k",
                      [("step", "mean reward", [("reward", [r["step"] for r in train], [r["reward"] for r in train])]),
                       ("step", "pass@k", [(k, [r["step"] for r in evals], [r[k] for r in evals]) for k in ks])]))
    return specs


def draw_plots(specs, out_dir: Path) -> tuple[list[tuple[str, str]], str | None]:
    """Writes the figures; returns ([(title, file name)], None), or ([], why there are none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'picochat[report]'), so this report has no plots"
    written = []
    for name, title, panels in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for ax, (xlabel, ylabel, series) in zip(axes[0], panels):
            for label, xs, ys in series:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if not any(len(xs) for _, xs, _ in series):
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            elif len(series) > 1:
                ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append((title, name))
    return written, None


# ---------------------------------------------------------------------------
# The report


def build_report(home: Path, out_dir: Path, tags: dict | None = None, now: datetime.datetime | None = None,
                 gpu_hour_usd: float = GPU_HOUR_USD) -> str:
    """The markdown text; plots go into out_dir, next to where the text will be written."""
    tags = tags or {}
    runs = {stage: find_run(stage, tags.get(stage)) for stage in STAGES}
    now = now or datetime.datetime.now(datetime.timezone.utc)
    lines = ["# picochat run report", "", f"Generated {now:%Y-%m-%d %H:%M} UTC from `{home}`.", "",
             "## Environment", ""]
    trained = runs["base"].meta.get("environment") if runs["base"] is not None else None
    here = environment()
    if trained:  # the training machine (base-train's), next to this one
        keys = list(dict.fromkeys([*trained, *here]))
        lines += table(["", "base-train ran on", "this report written on"],
                       [[k, trained.get(k, "n/a"), here.get(k, "n/a")] for k in keys])
    else:
        lines += table(["", "this report written on (base-train recorded none)"], [[k, v] for k, v in here.items()])
    if runs["base"] is not None:
        lines.append(f"\nbase-train: {runs['base'].meta.get('world_size', 1)} process(es), compute dtype "
                     f"{runs['base'].meta.get('compute_dtype', 'n/a')}")

    lines += ["", "## Tokenizer", ""]
    tok_eval = home / "tok_eval" / "tok_eval.md"
    tok_dir = home / "tokenizer"
    if not tok_dir.exists():
        lines.append("tok-train not run (no tokenizer).")
    else:
        from picochat.tokenizer import Tokenizer

        try:
            lines.append(f"vocabulary: {Tokenizer.from_directory(tok_dir).get_vocab_size():,} tokens")
        except PicochatError as e:
            lines.append(f"the tokenizer in {tok_dir} cannot be read ({e})")
        lines += ["", "```", tok_eval.read_text().rstrip(), "```"] if tok_eval.exists() else ["", "tok-eval not run."]

    for stage, title in STAGES.items():
        run = runs[stage]
        lines += ["", f"## {title}", ""]
        if run is None:
            lines.append(f"{title} not run (no checkpoint).")
            continue
        lines.append(f"tag `{run.tag}`, step {run.step:,}")
        if stage == "base":
            summary = model_summary(run.meta["model_config"])
            if summary is None:
                lines += ["", "model: this picochat version cannot build it (a checkpoint from another version)"]
            else:
                params = summary["params"]
                lines += ["", f"model: {run.meta['model_config']['n_layer']} layers, width "
                              f"{run.meta['model_config']['n_embd']}, {params['total']:,} parameters ("
                              + ", ".join(f"{k} {v:,}" for k, v in params.items() if k != "total")
                              + f"), {summary['flops_per_token']:.4g} training FLOPs per token"]
        elif "source_checkpoint" in run.meta or "base_checkpoint" in run.meta:
            src = run.meta.get("source_checkpoint") or {"stage": "base", **run.meta["base_checkpoint"]}
            lines += ["", f"from {src['stage']} `{src['tag']}` step {src['step']:,}"]
        lines += [""] + table(["", ""], [[k, v] for k, v in training_summary(run, gpu_hour_usd).items()])
        if stage == "base":
            lines += ["", "### CORE (base-eval)", ""] + core_lines(home, run) + ["", leaderboard(home, run)]
        last = training_records(run)[-1:] or [{}]
        if stage == "rl" and "reward" in last[0]:
            evals = eval_records(run, "pass@1")
            lines += ["", f"last step: mean reward {fmt(last[0]['reward'])}"
                      + (", " + ", ".join(f"{k} {fmt(v)}" for k, v in evals[-1].items() if k.startswith("pass@"))
                         if evals else "")]

    lines += ["", "## Chat evaluation (chat-eval)", ""] + chat_eval_lines(home, runs)

    base = runs["base"]
    result = None if base is None else step_results(home / "base_eval" / base.tag, "base_model_", base)
    lines += ["", "## Samples", ""]
    if result and result.get("samples"):
        lines += ["base model, greedy:", "", "```"] + [s.replace("```", "'''") for s in
                                                       result["samples"]["conditioned"]] + ["```"]
    else:
        lines.append("no base samples (base-eval with samples not run).")
    for stage, run in runs.items():
        if stage == "base" or run is None:
            continue
        result = step_results(home / "chat_eval" / f"{stage}_{run.tag}", "step_", run)
        answers = [(name, a) for name, task in (result or {}).get("tasks", {}).items() for a in task.get("samples", [])]
        if answers:
            lines += ["", f"{stage} model, chat-eval answers:", ""]
            for name, a in answers:
                question = " ".join(a["question"].split())[:200]
                answer = " ".join(a["answer"].split())[:300]
                lines.append(f"- {name} ({'right' if a['correct'] else 'wrong'}): {question!r} → {answer!r}")

    lines += ["", "## Plots", ""]
    written, why = draw_plots(plot_specs(runs), out_dir)
    if why:
        lines.append(why + ".")
    elif not written:
        lines.append("no training stage ran: nothing to plot.")
    lines += [f"![{title}]({name})" for title, name in written]
    return "\n".join(lines) + "\n"
