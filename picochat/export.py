"""The Hugging Face format: a checkpoint written as a folder that transformers loads, and read back.

    model.safetensors                 the weights under picochat's own names (or model-0000k-of-0000n
                                      shards and model.safetensors.index.json past the shard size)
    config.json                       PicochatConfig (architecture) + a "picochat" block: the run's
                                      GPTConfig, source, step and tokenizer fingerprint
    generation_config.json            stop at <|assistant_end|> (chat) or <|bos|> (a new document)
    modeling_picochat.py              the model for transformers (picochat/hf/modeling_picochat.py)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (hf_tokenizer.py)
    README.md                         the model card: the run's figures

The folder is written under a temporary name and renamed into place, so a killed export leaves
no half folder behind. Loading back (load_folder) builds picochat's own GPT from it: a model
someone else exported can be evaluated and served like a local checkpoint (-i hf --path DIR).
"""

import dataclasses
import glob
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.gpt import GPT, SOFTCAP, build_model, has_value_embedding
from picochat.hf_tokenizer import (
    CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_FILE,
    read_tokenizer_files,
    write_tokenizer_files,
)
from picochat.report import StageRun, step_results
from picochat.tokenizer import Tokenizer

MODELING_FILE = Path(__file__).parent / "hf" / "modeling_picochat.py"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # the Hub's usual limit per file
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------
# What transformers' stock NanoChat class lacks


def beyond_stock_nanochat(model: GPT) -> list[str]:
    """The features of this model that transformers' NanoChat class (the October-2025 architecture)
    cannot express; empty if it could hold the model."""
    c, r = model.config, model.recipe
    features = []
    if model.value_embeds:
        features.append("value embeddings")
    features.append("resid/x0 lambdas")  # every model mixes x0 back into the residual stream
    if r.smear:
        features.append("smear")
    if r.backout:
        features.append("backout")
    if any(w < c.sequence_len for w in model.window_sizes):
        features.append("sliding windows")
    if r.qk_scale != 1.0:
        features.append("QK gain")
    return features


def stock_nanochat_note(model: GPT) -> str:
    features = beyond_stock_nanochat(model)
    if not features:
        return ("This model uses no feature beyond transformers' NanoChat class; it is exported with picochat's "
                "own modeling code all the same.")
    return (f"transformers' NanoChat class cannot hold this model (it has no {', '.join(features)}), so the "
            "export ships its own modeling code: load it with trust_remote_code=True.")


# ---------------------------------------------------------------------------
# Writing


def hf_config(model: GPT, tokenizer: Tokenizer, dtype, provenance: dict) -> dict:
    c, r = model.config, model.recipe
    bos = tokenizer.get_bos_token_id()
    return {
        "architectures": ["PicochatForCausalLM"],
        "model_type": "picochat",
        "auto_map": {"AutoConfig": "modeling_picochat.PicochatConfig",
                     "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
        "vocab_size": c.vocab_size,
        "padded_vocab_size": model.padded_vocab,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len,
        "window_sizes": model.window_sizes,
        "value_embed_layers": [i for i in range(c.n_layer) if has_value_embedding(i, c.n_layer)],
        "rotary_base": r.rope_theta,
        "qk_scale": r.qk_scale,
        "ve_gate_channels": r.ve_gate_channels,
        "ve_gate_range": r.ve_gate_range,
        "smear_channels": model.smear_gate.in_features if r.smear else 0,
        "smear": r.smear,
        "backout": r.backout,
        "logit_softcap": SOFTCAP,
        "bos_token_id": bos,
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "pad_token_id": bos,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": DTYPE_NAMES[dtype],
        "picochat": {**provenance, "model_config": dataclasses.asdict(c), "tokenizer": tokenizer.fingerprint()},
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    bos = tokenizer.get_bos_token_id()
    # the engine's stop tokens: the end of an answer, or a new document for a base model
    return {"bos_token_id": bos, "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos],
            "pad_token_id": bos}


def shards(state: dict, max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into consecutive groups of at most max_bytes each (a tensor
    larger than that gets a file of its own)."""
    groups, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_weights(state: dict, folder: Path, max_bytes: int):
    groups = shards(state, max_bytes)
    if len(groups) == 1:
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def export_model(model: GPT, tokenizer: Tokenizer, meta: dict, provenance: dict, out_dir, dtype=torch.bfloat16,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False, home: Path | None = None) -> Path:
    """Write the folder (see the module docstring); provenance: source, model_tag, step. An existing
    out_dir is only replaced when force is set, and only if it is empty or an earlier export."""
    out_dir = Path(out_dir).absolute()
    tmp = work_folder(out_dir, "tmp", os.getpid())
    try:
        check_replaceable(out_dir, force, home)
        remove_leftovers(out_dir)
        tmp.mkdir(parents=True)
        state = {k.removeprefix("_orig_mod."): v.detach().to("cpu", dtype).contiguous()
                 for k, v in model.state_dict().items()}
        write_weights(state, tmp, max_shard_bytes)
        config = hf_config(model, tokenizer, dtype, provenance)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        write_tokenizer_files(tokenizer, tmp, model_max_length=model.config.sequence_len)
        (tmp / "README.md").write_text(model_card(model, meta, provenance, dtype, home))
        if out_dir.is_symlink():
            out_dir.unlink()  # replace the link itself, never what it points to
        if out_dir.exists():
            old = work_folder(out_dir, "old", os.getpid())
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old, out_dir)  # put the earlier export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as e:
        raise PicochatError(f"cannot write {out_dir} ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_export_file(name: str) -> bool:
    """A file name export_model writes (the shards of any earlier shard count included)."""
    if name in (WEIGHTS, INDEX, "config.json", "generation_config.json", MODELING_FILE.name, "README.md",
                TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        return True
    return re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def check_replaceable(out_dir: Path, force: bool, home: Path | None):
    """--force replaces an empty folder or an earlier export, never other work of the user's."""
    if out_dir.is_symlink():
        if not force:
            raise PicochatError(f"{out_dir} is a link: --force replaces the link (not what it points to)")
        return
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PicochatError(f"{out_dir} exists and is not a folder: choose another --output")
    names = sorted(p.name for p in out_dir.iterdir())
    if not names:
        return
    if not force:
        raise PicochatError(f"{out_dir} exists and is not empty: choose another --output, or --force to replace it")
    if home is not None and Path(home).resolve().is_relative_to(out_dir.resolve()):
        raise PicochatError(f"{out_dir} holds $PICOCHAT_HOME ({home}): --force will not replace it")
    try:
        read_config(out_dir)
    except PicochatError:
        raise PicochatError(f"{out_dir} is not a picochat export: --force only replaces an earlier export, "
                            "so choose another --output") from None
    foreign = [name for name in names if not is_export_file(name)]
    if foreign:
        raise PicochatError(f"{out_dir} holds files an export does not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}): move them, or choose another --output")


def work_folder(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.with_name(f"{out_dir.name}.picochat-{kind}-{pid}")


def remove_leftovers(out_dir: Path):
    """The work folders of an export killed before it renamed them into place: named after a
    process that is gone, holding export files only."""
    if not out_dir.parent.is_dir():
        return
    for leftover in out_dir.parent.glob(f"{glob.escape(out_dir.name)}.picochat-*-*"):
        kind, _, pid = leftover.name[len(out_dir.name) + len(".picochat-"):].partition("-")
        if kind not in ("tmp", "old") or not (pid.isascii() and pid.isdigit()) or process_alive(int(pid)):
            continue
        if leftover.is_dir() and not leftover.is_symlink() and all(is_export_file(p.name) for p in leftover.iterdir()):
            shutil.rmtree(leftover, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or no such pid to ask about): leave its folder alone
    return True


# ---------------------------------------------------------------------------
# The model card


def run_figures(model: GPT, meta: dict, provenance: dict, home: Path | None) -> list[tuple[str, str]]:
    """(name, value) rows of what the checkpoint and its evaluations recorded; absent ones are left out."""
    counts = model.num_scaling_params()
    rows = [("parameters", f"{counts['total']:,} ({counts['transformer_matrices']:,} in the blocks' matrices)")]
    source, tag, step = provenance["source"], provenance["model_tag"], provenance["step"]
    rows.append(("trained by", f"{ckpt.TRAINED_BY[source]}, tag {tag}, step {step}"))
    if source == "base" and meta.get("total_batch_size"):
        rows.append(("pretraining tokens", f"{step * meta['total_batch_size']:,}"))
    if meta.get("base_checkpoint"):
        b = meta["base_checkpoint"]
        rows.append(("from base model", f"tag {b['tag']}, step {b['step']}"))
    if meta.get("source_checkpoint"):
        s = meta["source_checkpoint"]
        rows.append(("from", f"{s['stage']} model, tag {s['tag']}, step {s['step']}"))
    loop = meta.get("loop_state") or {}
    if loop.get("val_bpb") is not None:
        rows.append((f"validation bits per byte ({STAGE_DATA[source]})", f"{loop['val_bpb']:.4f}"))
    if home is not None:
        run = StageRun(source, tag, step, meta, [])
        if source == "base":
            core = (step_results(home / "base_eval" / tag, "base_model_", run) or {}).get("core")
            if core:
                rows.append((core["metric_name"], f"{core['metric']:.4f}"))
        chat = step_results(home / "chat_eval" / f"{source}_{tag}", "step_", run)
        if chat and chat.get("metric") is not None:
            rows.append((chat["metric_name"], f"{chat['metric']:.4f}"))
    return rows


STAGE_DATA = {"base": "pretraining data", "sft": "SFT data", "rl": "RL data"}


def model_card(model: GPT, meta: dict, provenance: dict, dtype, home: Path | None) -> str:
    c = model.config
    rows = run_figures(model, meta, provenance, home)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [picochat]", "---", "",
        f"# picochat d{c.n_layer} ({provenance['source']} model)", "",
        f"A GPT trained from scratch with picochat: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads, "
        f"context {c.sequence_len}, vocabulary {c.vocab_size}, the `{c.preset}` architecture preset. "
        f"Weights in {DTYPE_NAMES[dtype]}.", "",
        stock_nanochat_note(model), "",
        "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,',
        '                                    return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(out[0, ids["input_ids"].size(1):], skip_special_tokens=True))',
        "```", "",
        "The chat template renders picochat's chat format (`<|user_start|>...<|user_end|><|assistant_start|>...`); "
        "an assistant message may be a list of parts `{\"type\": \"text\" | \"python\" | \"python_output\", "
        "\"text\": ...}`. `generate()` does not run picochat's python tool: a tool call comes out as text. "
        "To chat with the tool in picochat: `picochat chat-cli -i hf --path <folder>`.", "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Reading back


def read_config(folder) -> dict:
    """config.json of a picochat export, or a one-line error saying what the folder is instead."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise PicochatError(f"{folder} is not a folder (--path takes a folder written by `picochat export`)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PicochatError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise PicochatError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("model_type") != "picochat" or "picochat" not in config:
        kind = config.get("model_type", "unknown") if isinstance(config, dict) else "unknown"
        raise PicochatError(f"{folder} holds a {kind!r} model, not a picochat export (`picochat export` writes one)")
    block = config["picochat"]
    if not isinstance(block, dict) or not isinstance(block.get("model_config"), dict):
        raise PicochatError(f"{path} has no picochat model_config: the export is damaged")
    return config


def read_weights(folder: Path) -> dict:
    index = folder / INDEX
    try:
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / WEIGHTS).exists():
            files = [WEIGHTS]
        else:
            raise PicochatError(f"{folder} has neither {WEIGHTS} nor {INDEX}")
        state = {}
        for file in files:
            state.update(load_file(folder / file))
        return state
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PicochatError(f"cannot read the weights in {folder} ({type(e).__name__}: {e})") from None


def load_folder(folder, device, compute_dtype) -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, meta) of an exported folder, like checkpoint.load_model; meta holds the
    export's provenance (source, model_tag, step), its model_config and tokenizer fingerprint."""
    folder = Path(folder)
    meta = read_config(folder)["picochat"]
    config = ckpt.config_from_meta(meta)
    tokenizer = read_tokenizer_files(folder)
    ckpt.check_tokenizer(meta, tokenizer, f"the model in {folder}")
    model = build_model(config, device, compute_dtype)
    ckpt.load_state_into(model, read_weights(folder))
    model.eval()
    return model, tokenizer, meta


def folder_step(folder) -> tuple[str, int]:
    """(name, step) a loaded-back folder is known by: its folder name and the exported step."""
    meta = read_config(folder)["picochat"]
    return Path(folder).name, int(meta.get("step", 0))

