"""The CORE metric (DCLM paper): 22 in-context-learning tasks scored by next-token
losses, each accuracy centered on its random-guess baseline, then averaged.

Every score is the one the reference procedure gives (same shuffles, few-shot draws,
prompts, token spans and decision rules); we only evaluate faster:
- Examples are sorted by length and as many as fit in a token budget go through one forward
  pass (each with all its options), right-padded with BOS. The model is causal, so padding
  after a sequence cannot change the logits a span reads.
- The options of one example share their prompt up to the answer (the few-shot examples and
  the question). Where that saves enough tokens, the shared prefix runs once: the example
  becomes one sequence, prefix then each option's rest, and an attention.Packing lets every
  option see only the prefix and itself, at the positions it would have alone.
Both change the numbers only by float rounding (other shapes may run other kernels; tests
check the losses against the reference's one-example-per-forward way). Losses are only
computed at span positions, and averaged in float64 so that exactly tied options resolve to
the first one, as in the reference's argmin.

Three task types:
- multiple_choice: one prompt per choice; the choice whose tokens have the lowest mean loss wins.
- schema: one prompt per context option, all ending in the same continuation; the option under
  which that continuation has the lowest mean loss wins.
- language_modeling: correct iff greedy decoding reproduces the continuation exactly.
"""

import csv
import json
import os
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from filelock import FileLock
from tqdm import tqdm

from picochat.attention import Packing
from picochat.common import PicochatError, get_base_dir, get_rank, get_world_size, is_url, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Padded tokens per forward pass. The fp32 logits (and the softcap's temporaries) dominate memory:
# about 14 bytes x vocab per token, so ~3.7 GB at a 32K vocab.
BATCH_TOKENS = 8192

# ---------------------------------------------------------------------------
# The eval bundle: core.yaml (tasks), eval_meta_data.csv (baselines), eval_data/*.jsonl


def load_bundle() -> Path:
    """The bundle folder (the one holding core.yaml). PICOCHAT_EVAL_BUNDLE may name a folder,
    a local zip or a URL; by default the official zip is downloaded. Zips are unpacked into
    $PICOCHAT_HOME/eval_bundle once (under a file lock, so concurrent ranks fetch it once);
    delete that folder to unpack a different zip."""
    source = os.environ.get("PICOCHAT_EVAL_BUNDLE") or BUNDLE_URL
    if not is_url(source):
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "core.yaml").is_file():
                raise PicochatError(f"eval bundle folder {path} has no core.yaml")
            return path
        if not path.is_file():
            raise PicochatError(f"PICOCHAT_EVAL_BUNDLE={source} is neither a folder nor a zip file")
    base = get_base_dir()
    target = base / "eval_bundle"
    with FileLock(str(base / "eval_bundle.lock")):
        if not (target / "core.yaml").is_file():
            if is_url(source):
                zip_path = base / "eval_bundle.zip"
                _download(source, zip_path)
                _unzip(zip_path, target)
                zip_path.unlink()
            else:
                _unzip(Path(source).expanduser(), target)
    return target


def _download(url: str, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    print(f"downloading the eval bundle from {url}", flush=True)  # whichever rank holds the lock
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            response.raise_for_status()
            with open(tmp, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
    except requests.RequestException as e:
        tmp.unlink(missing_ok=True)
        raise PicochatError(f"could not download the eval bundle from {url}: {e}") from None
    os.replace(tmp, path)


def _unzip(zip_path: Path, target: Path):
    """Unpack into a temp folder, then move the folder holding core.yaml (the zip's root or
    its single top folder) to target, so target only ever appears complete."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
    except (zipfile.BadZipFile, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PicochatError(f"could not unpack the eval bundle {zip_path}: {e}") from None
    found = [p.parent for p in [tmp / "core.yaml", *tmp.glob("*/core.yaml")] if p.is_file()]
    if not found:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PicochatError(f"eval bundle zip {zip_path} has no core.yaml (at its root or in one top folder)")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(found[0], target)
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str  # between the context and the continuation
    baseline: float  # random-guess accuracy, in percent
    path: Path


def load_tasks(bundle_dir: Path) -> list[Task]:
    """Every task of core.yaml, in its order, with its baseline from eval_meta_data.csv."""
    try:
        with open(bundle_dir / "eval_meta_data.csv", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        entries = yaml.safe_load((bundle_dir / "core.yaml").read_text())["icl_tasks"]
        tasks = [Task(e["label"], e["icl_task_type"], int(e["num_fewshot"][0]), e.get("continuation_delimiter", " "),
                      baselines.get(e["label"], -1.0), bundle_dir / "eval_data" / e["dataset_uri"]) for e in entries]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as e:
        raise PicochatError(f"eval bundle {bundle_dir} is unreadable: {type(e).__name__}: {e}") from None
    for task in tasks:
        if task.task_type not in TASK_TYPES:
            raise PicochatError(f"task {task.label} in {bundle_dir / 'core.yaml'} has unknown type {task.task_type!r}")
        if task.label not in baselines:
            raise PicochatError(f"task {task.label} has no random baseline in {bundle_dir / 'eval_meta_data.csv'}")
    return tasks


def select_tasks(all_tasks: list[Task], labels=None) -> list[Task]:
    """The named tasks (core.yaml order), or all of them; each one's data file must exist."""
    selected = all_tasks
    if labels is not None:
        known = [t.label for t in all_tasks]
        unknown = [label for label in labels if label not in known]
        if unknown or not labels:
            what = f"unknown CORE task(s) {', '.join(unknown)}" if unknown else "no CORE tasks named"
            raise PicochatError(f"{what}; choose from: {', '.join(known)}")
        selected = [t for t in all_tasks if t.label in set(labels)]
    for task in selected:
        if not task.path.is_file():
            hint = "" if labels is not None else " (run a partial CORE by naming the other tasks with --tasks)"
            raise PicochatError(f"eval bundle is missing {task.path} for task {task.label}{hint}")
    return selected


def load_examples(task: Task, max_per_task: int = -1) -> list[dict]:
    """The task's items, shuffled with the reference seed and truncated to max_per_task (if > 0)."""
    with open(task.path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect accuracy (baseline in percent)."""
    return (accuracy - 0.01 * baseline) / (1.0 - 0.01 * baseline)


# ---------------------------------------------------------------------------
# Prompts and token spans


def fewshot_examples(data: list[dict], idx: int, k: int) -> list[dict]:
    """k other items of the (shuffled, truncated) list, drawn with a per-example seed."""
    if k == 0:
        return []
    if k > len(data) - 1:
        raise PicochatError(f"{k}-shot prompts need at least {k + 1} examples per task, only {len(data)} loaded "
                            "(raise max_per_task)")
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(1234 + idx).sample(others, k)]


def render_prompts(task_type: str, item: dict, delim: str, fewshot: list[dict]) -> list[str]:
    """The texts to score, one per option (multiple_choice, schema), or [without, with] the
    continuation (language_modeling). Each few-shot example is followed by a blank line."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{prefix}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delim}"
    # Stripped so a trailing space of the delimiter is not left dangling on its own: in the full
    # prompt it merges into the continuation's first token, and "without" must be a token prefix.
    return [without.strip(), without + item["continuation"]]


@dataclass
class Example:
    """One item, tokenized: the sequences to score, each with its scored span [start, end)."""
    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int  # the row that should win (0 for language modeling, which has one row)


def common_prefix_len(seqs) -> int:
    lo, hi = min(seqs), max(seqs)  # all sequences agree exactly as far as their lexicographic extremes do
    n = 0
    for a, b in zip(lo, hi):
        if a != b:
            break
        n += 1
    return n


def common_suffix_len(seqs) -> int:
    return common_prefix_len([s[::-1] for s in seqs])


def make_example(task_type: str, item: dict, token_lists: list[list[int]], label: str = "") -> Example:
    ends = [len(t) for t in token_lists]
    if task_type == "multiple_choice":
        start = common_prefix_len(token_lists)  # the answers start where the choices first differ
        return Example(token_lists, [start] * len(token_lists), ends, item["gold"])
    if task_type == "schema":
        suffix = common_suffix_len(token_lists)  # the shared continuation
        return Example(token_lists, [end - suffix for end in ends], ends, item["gold"])
    without, with_ = token_lists
    if len(without) >= len(with_) or with_[:len(without)] != without:
        raise PicochatError(f"task {label}: the prompt without its continuation does not tokenize to a prefix "
                            f"of the full prompt (context {item['context'][-60:]!r})")
    return Example([with_], [len(without)], [len(with_)], 0)


def crop(example: Example, max_len: int) -> Example:
    """The example with every row cut to its last max_len tokens and its spans shifted, as the
    reference does for a model with a maximum length (the answer is at the end, so it survives).
    A span keeps at least one token before it: position s-1 predicts token s."""
    rows, starts, ends = [], [], []
    for row, start, end in zip(example.rows, example.starts, example.ends):
        cut = max(0, len(row) - max_len)
        rows.append(row[cut:])
        starts.append(max(start - cut, 1))
        ends.append(end - cut)
    return Example(rows, starts, ends, example.gold)


def prepare_examples(tokenizer, task: Task, data: list[dict], indices, max_len: int | None = None) -> list[Example]:
    """Render and tokenize (BOS first) the items at indices of data; rows longer than max_len
    (the longest sequence the model can take) are cropped."""
    prompts = [render_prompts(task.task_type, data[i], task.delimiter, fewshot_examples(data, i, task.num_fewshot))
               for i in indices]
    flat = tokenizer.encode([p for ps in prompts for p in ps], prepend=tokenizer.get_bos_token_id())
    examples, k = [], 0
    for i, ps in zip(indices, prompts):
        example = make_example(task.task_type, data[i], flat[k:k + len(ps)], task.label)
        examples.append(example if max_len is None else crop(example, max_len))
        k += len(ps)
    return examples


# ---------------------------------------------------------------------------
# Scoring


def pack(example: Example):
    """The example's rows as one sequence: their common token prefix once, then the rest of each
    row (see attention.Packing). Returns (tokens, positions, segments, prev, where), where[r][p]
    being the packed index of row r's token p. One row packs to itself."""
    rows = example.rows
    shared = common_prefix_len(rows)
    tokens, positions, segments = list(rows[0][:shared]), list(range(shared)), [0] * shared
    where = []
    for s, row in enumerate(rows, start=1):
        where.append(list(range(shared)) + list(range(len(tokens), len(tokens) + len(row) - shared)))
        tokens += row[shared:]
        positions += range(shared, len(row))
        segments += [s] * (len(row) - shared)
    prev = list(range(len(tokens)))
    for w in where:
        for p in range(1, len(w)):
            prev[w[p]] = w[p - 1]
    return tokens, positions, segments, prev, where


def packed_len(example: Example) -> int:
    shared = common_prefix_len(example.rows)
    return shared + sum(len(row) - shared for row in example.rows)


def should_pack(examples: list[Example]) -> bool:
    """Share each example's prefix (few-shot examples and question, computed once for all its
    options) where that saves at least 20% of the tokens; otherwise the plain causal forward is
    cheaper than the dense mask a packing needs."""
    plain = sum(len(row) for ex in examples for row in ex.rows)
    return sum(packed_len(ex) for ex in examples) <= 0.8 * plain


def padded(lists, value) -> torch.Tensor:
    T = max(map(len, lists))
    return torch.tensor([list(x) + [value] * (T - len(x)) for x in lists], dtype=torch.long)


@torch.no_grad()
def score_batch(model, examples: list[Example], pad_id: int, device, packed: bool):
    """One forward over the examples, right-padded with pad_id: one sequence per example when
    packed, else one per option. For each option: the mean loss over its span and whether greedy
    argmax predicts every span token. Position t's logits predict token t+1, so span [s, e) is
    read from logits [s-1, e-1)."""
    seqs, layouts, reads = [], [], []  # reads: per option, (sequence, index of each of its tokens)
    for ex in examples:
        if packed:
            tokens, positions, segments, prev, where = pack(ex)
            reads += [(len(seqs), w) for w in where]
            seqs.append(tokens)
            layouts.append((positions, segments, prev))
        else:
            for row in ex.rows:
                reads.append((len(seqs), range(len(row))))
                seqs.append(row)
    ids = padded(seqs, pad_id)
    packing = None
    if packed:  # padding: position 0 of a segment of its own (-1), so it sees at least itself (no NaN); never read
        positions, segments, prev = (padded(x, fill).to(device) for x, fill in zip(zip(*layouts), (0, -1, 0)))
        packing = Packing(positions, segments, prev)
    spans = [(s, e) for ex in examples for s, e in zip(ex.starts, ex.ends)]
    picks = [(b, w[p - 1], w[p]) for (b, w), (s, e) in zip(reads, spans) for p in range(s, e)]
    seq_idx, logit_idx, target_idx = torch.tensor(picks, dtype=torch.long).view(-1, 3).T
    lengths = torch.tensor([e - s for s, e in spans])
    option_idx = torch.repeat_interleave(torch.arange(len(spans)), lengths)
    targets = ids[seq_idx, target_idx].to(device)
    logits = model(ids.to(device)) if packing is None else model(ids.to(device), packing=packing)
    span_logits = logits[seq_idx.to(device), logit_idx.to(device)].float()
    losses = F.cross_entropy(span_logits, targets, reduction="none").cpu()
    misses = (span_logits.argmax(dim=-1) != targets).cpu()
    # Mean in float64: n equal fp32 losses then average to exactly that loss, so exact ties
    # (e.g. a model with uniform logits) always go to the first option, whatever the span lengths.
    sums = torch.zeros(len(spans), dtype=torch.float64).index_add_(0, option_idx, losses.double())
    miss_counts = torch.zeros(len(spans), dtype=torch.long).index_add_(0, option_idx, misses.long())
    return (sums / lengths).tolist(), (miss_counts == 0).tolist()


def length_batches(examples: list[Example], batch_tokens: int, packed: bool = False):
    """Lists of example indices, longest examples first, each batch holding as many examples as
    fit in batch_tokens once padded to its longest sequence (one per option, or one per example
    when packed); always at least one."""
    def size(ex):  # (sequences, longest)
        return (1, packed_len(ex)) if packed else (len(ex.rows), max(map(len, ex.rows)))

    order = sorted(range(len(examples)), key=lambda i: size(examples[i])[1], reverse=True)
    batch, rows, T = [], 0, 0
    for i in order:
        n, longest = size(examples[i])
        if batch and (rows + n) * T > batch_tokens:
            yield batch
            batch, rows = [], 0
        if not batch:
            T = longest
        batch.append(i)
        rows += n
    if batch:
        yield batch


def score_examples(model, examples: list[Example], pad_id: int, device, batch_tokens: int = BATCH_TOKENS,
                   desc=None, share_prefix: bool | None = None):
    """(mean losses, exact matches) per example, several examples per forward (see length_batches).
    batch_tokens 1 is the reference's grouping: one example (all its options) per forward.
    share_prefix None packs where it pays (should_pack); True/False forces it."""
    packed = should_pack(examples) if share_prefix is None else share_prefix
    results = [None] * len(examples)
    bar = tqdm(total=len(examples), desc=desc, leave=False, disable=desc is None or get_rank() != 0)
    for batch in length_batches(examples, batch_tokens, packed):
        means, exact = score_batch(model, [examples[i] for i in batch], pad_id, device, packed)
        k = 0
        for i in batch:
            n = len(examples[i].rows)
            results[i] = (means[k:k + n], exact[k:k + n])
            k += n
        bar.update(len(batch))
    bar.close()
    return results


def is_correct(task_type: str, example: Example, mean_losses: list[float], exact: list[bool]) -> bool:
    if task_type == "language_modeling":
        return exact[0]
    return mean_losses.index(min(mean_losses)) == example.gold  # ties go to the first option


def evaluate_task(model, tokenizer, task: Task, device, max_per_task: int = -1,
                  batch_tokens: int = BATCH_TOKENS, share_prefix: bool | None = None) -> torch.Tensor:
    """Per-example correctness (0./1.) of one task. Rank r scores examples r, r+W, ...; the
    vectors are summed across ranks."""
    data = load_examples(task, max_per_task)
    indices = range(get_rank(), len(data), get_world_size())
    # the longest sequence the model can take: its rotary table (10x its training length)
    examples = prepare_examples(tokenizer, task, data, indices, getattr(model, "rotary_len", None))
    scores = score_examples(model, examples, tokenizer.get_bos_token_id(), device, batch_tokens, desc=task.label,
                            share_prefix=share_prefix)
    correct = torch.zeros(len(data), dtype=torch.float32)
    for i, example, (means, exact) in zip(indices, examples, scores):
        correct[i] = float(is_correct(task.task_type, example, means, exact))
    if dist.is_available() and dist.is_initialized() and get_world_size() > 1:
        correct = correct.to(device)
        dist.all_reduce(correct)
    return correct.cpu()


def core_metric_name(num_tasks: int, total_tasks: int, max_per_task: int) -> tuple[str, str]:
    """(printed name, metrics key) of a mean centered score. Only all tasks, uncapped, is "CORE",
    the metric GPT-2's 0.256525 refers to; anything less says what it left out."""
    if num_tasks == total_tasks and max_per_task <= 0:
        return "CORE", "core"
    parts, key = [], "core_partial"
    if num_tasks != total_tasks:
        parts.append(f"{num_tasks}/{total_tasks} tasks")
        key += f"_{num_tasks}of{total_tasks}"
    if max_per_task > 0:
        parts.append(f"at most {max_per_task} examples per task")
        key += f"_max{max_per_task}"
    return f"CORE (partial: {', '.join(parts)})", key


def evaluate_core(model, tokenizer, device, max_per_task: int = -1, tasks=None,
                  batch_tokens: int = BATCH_TOKENS, share_prefix: bool | None = None) -> dict:
    """Evaluate the CORE tasks (all, or the labels in tasks); batch_tokens and share_prefix as in
    score_examples. Returns
    - "tasks": {label: {accuracy, centered, baseline, num_fewshot, task_type, examples, seconds}}
    - "metric_name", "metric_key", "metric": the mean centered score of the tasks that ran, named
      by core_metric_name (CORE only for all tasks, uncapped)
    - "core": the CORE value, or None for a partial or capped run; "num_tasks", "total_tasks"
    - "examples", "seconds", "examples_per_s": throughput over all ranks."""
    bundle = load_bundle()
    all_tasks = load_tasks(bundle)
    selected = select_tasks(all_tasks, tasks)  # fails before any work if a task file is missing
    results, t0 = {}, time.time()
    for task in selected:
        t1 = time.time()
        correct = evaluate_task(model, tokenizer, task, device, max_per_task, batch_tokens, share_prefix)
        accuracy = correct.sum().item() / len(correct)
        results[task.label] = {
            "accuracy": accuracy, "centered": centered(accuracy, task.baseline), "baseline": task.baseline,
            "num_fewshot": task.num_fewshot, "task_type": task.task_type, "examples": len(correct),
            "seconds": time.time() - t1,
        }
        r = results[task.label]
        print0(f"{task.label:<34} {task.num_fewshot:>2}-shot {task.task_type:<17} accuracy {accuracy:.4f} "
               f"| centered {r['centered']:+.4f} | {r['examples']} examples in {r['seconds']:.1f}s")
    seconds = time.time() - t0
    metric = sum(r["centered"] for r in results.values()) / len(results)
    name, key = core_metric_name(len(results), len(all_tasks), max_per_task)
    examples = sum(r["examples"] for r in results.values())
    return {
        "tasks": results,
        "metric_name": name,
        "metric_key": key,
        "metric": metric,
        "core": metric if key == "core" else None,
        "num_tasks": len(results),
        "total_tasks": len(all_tasks),
        "max_per_task": max_per_task,
        "examples": examples,
        "seconds": seconds,
        "examples_per_s": examples / seconds if seconds > 0 else float("inf"),
    }


def format_table(result: dict) -> str:
    """Per-task accuracy and centered score, then the (possibly partial) CORE row."""
    lines = [f"{'Task':<35} {'Accuracy':>9} {'Centered':>9}"]
    lines += [f"{label:<35} {r['accuracy']:>9.4f} {r['centered']:>9.4f}" for label, r in result["tasks"].items()]
    lines.append(f"{result['metric_name']:<35} {'':>9} {result['metric']:>9.4f}")
    return "\n".join(lines)
