"""Checkpoints: saving a training run so it can be resumed exactly, and loading a
model for evaluation or a later stage.

A run's checkpoints live in $PICOCHAT_HOME/<stage>_checkpoints/<tag>/ (stage is
"base", "sft" or "rl"), one set of files per saved step:

    model_{step:06d}.pt            rank 0: the uncompiled model's state_dict
    optim_{step:06d}_rank{r}.pt    every rank: its optimizer shard, its loader state, its RNG states, ...
    meta_{step:06d}.json           rank 0, written last: step, configs, batch sizes, loop state, ...

Every file is written under a temporary name and renamed into place, and the meta
file only once every rank's files exist, so a step without a meta file is an
unfinished save: it is ignored, and a kill at any moment leaves the previous
complete checkpoint as the latest one.
"""

import dataclasses
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from picochat.common import PicochatError, get_base_dir
from picochat.gpt import GPTConfig, build_model
from picochat.tokenizer import get_tokenizer

# which training stage wrote a checkpoint (the chat stages' -i/--source flag)
SOURCES = ("base", "sft", "rl")
TRAINED_BY = {"base": "picochat base-train", "sft": "picochat chat-sft", "rl": "picochat chat-rl"}

MODEL_RE = re.compile(r"model_(\d+)\.pt")
META_RE = re.compile(r"meta_(\d+)\.json")
OPTIM_RE = re.compile(r"optim_(\d+)_rank(\d+)\.pt")
DEPTH_TAG_RE = re.compile(r"d(\d+)")


# ---------------------------------------------------------------------------
# Where things are


def checkpoints_root(stage: str) -> Path:
    if stage not in SOURCES:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(SOURCES)})")
    return get_base_dir() / f"{stage}_checkpoints"


def checkpoint_dir(stage: str, tag: str) -> Path:
    return checkpoints_root(stage) / tag


def model_path(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.pt"


def meta_path(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"


def optim_path(ckpt_dir, step: int, rank: int) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank{rank}.pt"


def complete_steps(ckpt_dir) -> list[int]:
    """Steps whose save finished (meta and model both present), ascending. Names are matched
    whole, so temp files and anything else in the folder are ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = META_RE.fullmatch(p.name)
        if m and model_path(ckpt_dir, int(m.group(1))).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(ckpt_dir) -> int | None:
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def find_latest_tag(stage: str) -> str | None:
    """The tag with the largest depth among d<N> tags, else the most recently modified one;
    only tags holding at least one complete checkpoint count."""
    root = checkpoints_root(stage)
    if not root.is_dir():
        return None
    tags = [p for p in root.iterdir() if p.is_dir() and complete_steps(p)]
    if not tags:
        return None
    depth_tags = [p for p in tags if DEPTH_TAG_RE.fullmatch(p.name)]
    if depth_tags:
        return max(depth_tags, key=lambda p: int(p.name[1:])).name
    return max(tags, key=lambda p: p.stat().st_mtime).name


def latest_source() -> str | None:
    """The most trained stage that has a checkpoint: rl, then sft, then base."""
    return next((stage for stage in reversed(SOURCES) if find_latest_tag(stage) is not None), None)


def pick_source(source: str | None) -> str:
    """source if given, else the most trained stage with a checkpoint; a one-line error if none."""
    source = source or latest_source()
    if source is None:
        raise PicochatError(f"no model checkpoints in {get_base_dir()}: `picochat base-train` creates one "
                            "(and `picochat chat-sft` a chat model from it)")
    return source


def resolve_checkpoint(stage: str, model_tag: str | None = None, step: int | None = None) -> tuple[Path, int]:
    """(folder, step) of a complete checkpoint; latest tag and last step when not given."""
    root = checkpoints_root(stage)
    if model_tag is None:
        model_tag = find_latest_tag(stage)
        if model_tag is None:
            raise PicochatError(f"no {stage} checkpoints in {root}: `{TRAINED_BY[stage]}` creates them")
    ckpt_dir = root / model_tag
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise PicochatError(f"no complete checkpoint in {ckpt_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise PicochatError(f"no complete checkpoint at step {step} in {ckpt_dir} "
                            f"(saved steps: {', '.join(map(str, steps))})")
    return ckpt_dir, step


# ---------------------------------------------------------------------------
# Writing


def _replace_into(path: Path, write):
    """write(file) into a temp file beside path, flush it to disk, then rename over path."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(ckpt_dir, step: int, model_state: dict | None, optim_state: dict, meta: dict, rank: int):
    """Called by every rank: each writes its optim shard, rank 0 also the model and, once all
    ranks are done, the meta file that marks the checkpoint complete."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # on every rank: nodes may not share a file system
    _replace_into(optim_path(ckpt_dir, step, rank), lambda f: torch.save(optim_state, f))
    if rank == 0:
        _replace_into(model_path(ckpt_dir, step), lambda f: torch.save(model_state, f))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        text = json.dumps(meta, indent=2) + "\n"
        _replace_into(meta_path(ckpt_dir, step), lambda f: f.write(text.encode()))


def remove_checkpoints(ckpt_dir) -> int:
    """Delete every checkpoint file in ckpt_dir (meta first, so an interrupted removal leaves
    no complete-looking checkpoint); returns how many steps had files."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return 0
    files = [p for p in ckpt_dir.iterdir() if any(r.fullmatch(p.name) for r in (MODEL_RE, META_RE, OPTIM_RE))]
    steps = {int(re.search(r"\d+", p.name).group()) for p in files}
    for p in sorted(files, key=lambda p: not META_RE.fullmatch(p.name)):
        p.unlink()
    return len(steps)


# ---------------------------------------------------------------------------
# Reading


def load_meta(ckpt_dir, step: int) -> dict:
    path = meta_path(ckpt_dir, step)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PicochatError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def load_model_state(ckpt_dir, step: int, device) -> dict:
    path = model_path(ckpt_dir, step)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise PicochatError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def load_optim_state(ckpt_dir, step: int, rank: int, device) -> dict:
    path = optim_path(ckpt_dir, step, rank)
    if not path.exists():
        raise PicochatError(f"{path} is missing: the checkpoint at step {step} cannot be resumed by rank {rank}")
    # our own file; it holds numpy and Python RNG states, which weights_only refuses
    return torch.load(path, map_location=device, weights_only=False)


def config_from_meta(meta: dict) -> GPTConfig:
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    saved = meta["model_config"]
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise PicochatError(f"checkpoint has model settings this version does not know: {', '.join(unknown)}")
    return GPTConfig(**saved)


def check_same_config(saved: dict, current: GPTConfig, what: str):
    """Raise a clear error naming the settings where a checkpoint's model differs from current."""
    now = dataclasses.asdict(current)
    diffs = [f"{k} {saved.get(k)!r} vs {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        raise PicochatError(f"{what} was trained with another model config ({'; '.join(diffs)})")


def check_tokenizer(meta: dict, tokenizer, where: str):
    """Refuse a checkpoint trained with another tokenizer: the same vocab size with other merges would
    silently map every id to another string."""
    if meta["model_config"]["vocab_size"] != tokenizer.get_vocab_size():
        raise PicochatError(f"{where} was trained with a vocabulary of {meta['model_config']['vocab_size']} tokens, "
                            f"but the tokenizer in $PICOCHAT_HOME has {tokenizer.get_vocab_size()}")
    saved = meta.get("tokenizer")
    if saved is None:
        return  # saved before checkpoints recorded their tokenizer: only the size can be checked
    if saved != tokenizer.fingerprint():
        raise PicochatError(f"{where} was trained with another tokenizer than the one in $PICOCHAT_HOME (same "
                            f"vocab size, other merges; fingerprint {saved[:12]} vs {tokenizer.fingerprint()[:12]}): "
                            "use the tokenizer it was trained with")


def load_state_into(model: torch.nn.Module, state: dict):
    """Load a saved state_dict into a built model. Keys lose torch.compile's prefix and every tensor
    takes the dtype the model keeps that entry in (e.g. bf16 embeddings become fp32 on CPU), so
    assign=True swaps in tensors of exactly the model's own dtypes."""
    own = model.state_dict()
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise PicochatError(f"checkpoint does not fit the model (missing: {', '.join(missing) or '-'}; "
                            f"unexpected: {', '.join(unexpected) or '-'})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise PicochatError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
        state[k] = v.to(device=own[k].device, dtype=own[k].dtype)
    model.load_state_dict(state, strict=True, assign=True)


def load_model(stage: str, device, compute_dtype, model_tag: str | None = None, step: int | None = None):
    """(model, tokenizer, meta) of a saved checkpoint, latest tag and step by default. The model
    is built on the meta device and filled from the file; it is left in eval mode."""
    ckpt_dir, step = resolve_checkpoint(stage, model_tag, step)
    meta = load_meta(ckpt_dir, step)
    config = config_from_meta(meta)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, f"the checkpoint at step {step} in {ckpt_dir}")
    model = build_model(config, device, compute_dtype)
    load_state_into(model, load_model_state(ckpt_dir, step, device))
    model.eval()
    return model, tokenizer, meta


# ---------------------------------------------------------------------------
# RNG states (part of each rank's optim file, for exact resume)


def get_rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
