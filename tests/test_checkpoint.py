"""Checkpoint files: layout, atomic saves (unfinished saves and temp files are ignored),
latest tag/step discovery, and load_model (prefix stripping, dtype casts, clear errors)."""

import json
import os
import random

import numpy as np
import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.gpt import build_model, config_from_depth


def tiny_config(vocab_size=1024, depth=2):
    return config_from_depth(depth, vocab_size, max_seq_len=64, aspect_ratio=64, head_dim=64, window_pattern="L")


class FailsToSave:
    def __reduce__(self):
        raise OSError("disk full")


def save_step(ckpt_dir, step, model=None, config=None, optim_state=None):
    config = config or tiny_config()
    meta = {"step": step, "model_config": ckpt.dataclasses.asdict(config)}
    state = model.state_dict() if model is not None else {"w": torch.zeros(2)}
    ckpt.save_checkpoint(ckpt_dir, step, state, optim_state or {"rank": 0}, meta, rank=0)


def test_layout_and_discovery(picochat_home):
    d = ckpt.checkpoint_dir("base", "d2")
    assert d == picochat_home / "base_checkpoints" / "d2"
    for step in (5, 10):
        save_step(d, step)
    assert sorted(p.name for p in d.iterdir()) == [
        "meta_000005.json", "meta_000010.json", "model_000005.pt", "model_000010.pt",
        "optim_000005_rank0.pt", "optim_000010_rank0.pt"]
    assert json.loads((d / "meta_000010.json").read_text())["step"] == 10
    assert ckpt.complete_steps(d) == [5, 10]
    assert ckpt.find_last_step(d) == 10
    assert ckpt.find_last_step(picochat_home / "nothing") is None


def test_unfinished_saves_and_stray_files_are_ignored(picochat_home):
    d = ckpt.checkpoint_dir("base", "run")
    save_step(d, 3)
    # what a kill during the save of step 7 can leave behind: temp files and files without a meta
    torch.save({"w": torch.ones(2)}, d / "model_000007.pt")
    (d / "meta_000007.json.tmp1234").write_text("{")
    (d / "model_000008.pt.tmp99").write_bytes(b"partial")
    # names that only look like checkpoints
    (d / "meta_12.json.bak").write_text("{}")
    (d / "meta_abc.json").write_text("{}")
    (d / "model_0009_extra.pt").write_bytes(b"")
    (d / "meta_000011.json").write_text("{}")  # meta whose model file is gone
    assert ckpt.complete_steps(d) == [3]
    assert ckpt.resolve_checkpoint("base", "run") == (d, 3)
    with pytest.raises(PicochatError, match="no complete checkpoint at step 7"):
        ckpt.resolve_checkpoint("base", "run", step=7)


def test_failed_save_leaves_previous_checkpoint_intact(picochat_home):
    d = ckpt.checkpoint_dir("base", "run")
    save_step(d, 1)
    before = sorted(p.name for p in d.iterdir())
    # torch.save fails part-way through the optim file (as if the disk filled up)
    with pytest.raises(OSError, match="disk full"):
        save_step(d, 2, optim_state={"weights": torch.ones(1000), "then": FailsToSave()})
    assert sorted(p.name for p in d.iterdir()) == before  # no temp file, no step 2 files
    assert ckpt.find_last_step(d) == 1
    # overwriting a step replaces its files whole
    save_step(d, 1, optim_state={"rank": 0, "new": True})
    assert ckpt.load_optim_state(d, 1, 0, "cpu")["new"] is True


def test_remove_checkpoints(picochat_home):
    d = ckpt.checkpoint_dir("base", "run")
    save_step(d, 1)
    save_step(d, 2)
    (d / "metrics.jsonl").write_text("")
    assert ckpt.remove_checkpoints(d) == 2
    assert [p.name for p in d.iterdir()] == ["metrics.jsonl"]


def test_latest_tag(picochat_home):
    assert ckpt.find_latest_tag("base") is None
    for tag in ("d9", "d10", "d2"):
        save_step(ckpt.checkpoint_dir("base", tag), 1)
    ckpt.checkpoint_dir("base", "d30").mkdir()  # no complete checkpoint: does not count
    assert ckpt.find_latest_tag("base") == "d10"  # numeric, not "d9" > "d10" as strings

    for i, tag in enumerate(("zeta", "alpha")):
        d = ckpt.checkpoint_dir("sft", tag)
        save_step(d, 1)
        os.utime(d, (1000 + i, 1000 + i))
    assert ckpt.find_latest_tag("sft") == "alpha"  # no d<N> tags: the most recently modified
    with pytest.raises(PicochatError, match="no rl checkpoints"):
        ckpt.resolve_checkpoint("rl")


def test_load_model_roundtrip(picochat_home, small_tokenizer):
    small_tokenizer.save(picochat_home / "tokenizer")
    config = tiny_config(small_tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = build_model(config, "cpu", torch.float32)
    d = ckpt.checkpoint_dir("base", "d2")
    save_step(d, 4, model, config)
    # a compiled model's state_dict carries torch.compile's prefix; loading must strip exactly it
    prefixed = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save(prefixed, ckpt.model_path(d, 4))

    loaded, tokenizer, meta = ckpt.load_model("base", "cpu", torch.float32)
    assert meta["step"] == 4 and not loaded.training
    assert tokenizer.get_vocab_size() == config.vocab_size
    own, theirs = model.state_dict(), loaded.state_dict()
    assert own.keys() == theirs.keys()
    for k in own:
        assert torch.equal(own[k], theirs[k]), k
    idx = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def test_bf16_checkpoint_loads_as_fp32_on_cpu(picochat_home, small_tokenizer):
    small_tokenizer.save(picochat_home / "tokenizer")
    config = tiny_config(small_tokenizer.get_vocab_size())
    model = build_model(config, "cpu", torch.float32)
    bf16_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    d = ckpt.checkpoint_dir("base", "d2")
    save_step(d, 1, model, config)
    torch.save(bf16_state, ckpt.model_path(d, 1))
    loaded, _, _ = ckpt.load_model("base", "cpu", torch.float32, model_tag="d2", step=1)
    for k, v in loaded.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype, k
        assert torch.equal(v, bf16_state[k].to(v.dtype)), k


def test_load_model_errors(picochat_home, small_tokenizer):
    with pytest.raises(PicochatError, match="no base checkpoints"):
        ckpt.load_model("base", "cpu", torch.float32)
    small_tokenizer.save(picochat_home / "tokenizer")
    d = ckpt.checkpoint_dir("base", "d2")

    # trained with another vocabulary than the tokenizer now in $PICOCHAT_HOME
    config = tiny_config(vocab_size=2048)
    save_step(d, 1, build_model(config, "cpu", torch.float32), config)
    with pytest.raises(PicochatError, match="vocabulary of 2048 tokens.*has 1024"):
        ckpt.load_model("base", "cpu", torch.float32)

    # tensors that do not fit the config in the meta file (here: a depth-3 model's weights)
    config = tiny_config()
    save_step(d, 2, build_model(tiny_config(depth=3), "cpu", torch.float32), config)
    with pytest.raises(PicochatError, match="does not fit the model"):
        ckpt.load_model("base", "cpu", torch.float32, step=2)

    # a meta file from a model version with settings we do not know
    save_step(d, 3, build_model(config, "cpu", torch.float32), config)
    meta = json.loads(ckpt.meta_path(d, 3).read_text())
    meta["model_config"]["n_experts"] = 8
    ckpt.meta_path(d, 3).write_text(json.dumps(meta))
    with pytest.raises(PicochatError, match="n_experts"):
        ckpt.load_model("base", "cpu", torch.float32, step=3)

    with pytest.raises(PicochatError, match="another model config.*n_layer 3 vs 2"):
        ckpt.check_same_config(ckpt.dataclasses.asdict(tiny_config(depth=3)), config, "it")


def test_rng_state_roundtrip():
    state = ckpt.get_rng_state("cpu")
    first = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state, "cpu")
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
