"""`picochat export`: the folder transformers loads (in a subprocess where picochat cannot be
imported, tests/hf_check.py) computes our logits, generates our engine's tokens and renders our
chat format; loading it back gives our weights; a bad folder is a one-line error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat import checkpoint as ckpt
from picochat.common import PicochatError
from picochat.engine import Engine
from picochat.export import INDEX, WEIGHTS, load_folder, process_alive, read_config, read_weights
from picochat.gpt import GPTConfig, build_model
from picochat.stages import export as export_stage

TESTS = Path(__file__).parent

TEXTS = ["Hello world, don't stop: I'LL go!", "12345 + 678 = 13023", "  spaces\tand\ttabs\n\n\nnewlines  ",
         "café naïve Ørsted 東京 🙂 ∑xᵢ", "zqxjv wrbl unusual-merges!!!???", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And again?"},
     {"role": "assistant", "content": "Hello again."}],
    [{"role": "user", "content": "Compute 12*7"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                       {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"},
                                       {"type": "text", "text": " The answer is 84."}]}],
]


def no_tool(_):
    return None  # transformers' generate() runs no tool: neither may our engine here


def random_checkpoint(home: Path, tokenizer, preset: str) -> str:
    """A random model with sliding windows (T=256, short window 128) and perturbed weights, so
    every gate and lambda matters, saved as a base checkpoint."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=2, n_kv_head=1,
                       n_embd=64, window_pattern="SL", preset=preset)
    model = build_model(config, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tag = f"rand_{preset}"
    meta = {"model_config": config.__dict__, "tokenizer": tokenizer.fingerprint(), "step": 1}
    ckpt.save_checkpoint(ckpt.checkpoint_dir("base", tag), 1, model.state_dict(), {}, meta, rank=0)
    return tag


@pytest.fixture(scope="module")
def exports(tmp_path_factory, base_home, small_tokenizer):
    """(home, {name: folder}): exports of a random default-preset and jan29 model (fp32, the jan29 one
    in tiny shards) and of the trained tiny base model (fp32, and bf16)."""
    home = tmp_path_factory.mktemp("export_home")
    shutil.copytree(base_home, home, dirs_exist_ok=True)
    out = tmp_path_factory.mktemp("exports")
    saved = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    try:
        folders = {}
        for preset, shard_mb in [("default", 5000.0), ("jan29", 0.1)]:
            tag = random_checkpoint(home, small_tokenizer, preset)
            folders[preset] = export_stage.run(export_stage.ExportConfig(
                source="base", model_tag=tag, output=str(out / preset), dtype="fp32", max_shard_mb=shard_mb))
        folders["trained"] = export_stage.run(export_stage.ExportConfig(source="base", model_tag="d2",
                                                                        output=str(out / "trained"), dtype="fp32"))
        folders["bf16"] = export_stage.run(export_stage.ExportConfig(source="base", model_tag="d2",
                                                                     output=str(out / "bf16")))
    finally:
        os.environ["PICOCHAT_HOME"] = saved or ""
        if saved is None:
            del os.environ["PICOCHAT_HOME"]
    return home, folders


def ask_transformers(folder: Path, request: dict, tmp_path: Path) -> dict:
    torch.save(request, tmp_path / "request.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, str(TESTS / "hf_check.py"), str(folder), str(tmp_path / "request.pt"),
                          str(tmp_path / "answer.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(tmp_path / "answer.pt")


def load_ours(home: Path, tag: str):
    saved = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    try:
        return ckpt.load_model("base", "cpu", torch.float32, tag)
    finally:
        os.environ["PICOCHAT_HOME"] = saved or ""
        if saved is None:
            del os.environ["PICOCHAT_HOME"]


@pytest.mark.parametrize("name,tag,length", [("default", "rand_default", 200), ("jan29", "rand_jan29", 200),
                                              ("trained", "d2", 60)])
def test_transformers_computes_what_we_compute(exports, name, tag, length, tmp_path):
    home, folders = exports
    model, tokenizer, _ = load_ours(home, tag)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, tokenizer.get_vocab_size(), (2, length), generator=g)
    prompts = [tokenizer.encode("The quick brown", prepend="<|bos|>"),
               tokenizer.render_for_completion({"messages": CONVERSATIONS[0]})]
    request = {"batch": batch, "prompts": prompts, "texts": TEXTS, "conversations": CONVERSATIONS}
    answer = ask_transformers(folders[name], request, tmp_path)
    assert answer["class"] == "PicochatForCausalLM"

    with torch.no_grad():
        ours = model(batch)
    assert (answer["logits"] - ours).abs().max().item() < 1e-5  # rows longer than the short window (128)

    engine = Engine(model, tokenizer, tool=no_tool)
    stops = engine.stop_tokens
    for prompt, theirs, batched in zip(prompts, answer["generated"], answer["generated_batch"]):
        (ours_seq,), _ = engine.generate_batch(prompt, temperature=0.0, max_tokens=20)
        new = theirs[len(prompt):]
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        assert new[:cut] == ours_seq[len(prompt):], "greedy generate() differs from our engine"
        batched_cut = next((i for i, t in enumerate(batched) if t in stops), len(batched))
        assert batched[:batched_cut] == new[:cut], "a left-padded row generates other tokens than alone"

    bos = tokenizer.get_bos_token_id()
    assert answer["encoded"] == [[bos] + tokenizer.encode(t) for t in TEXTS]
    assert answer["decoded"] == TEXTS
    for messages, chat, prompt in zip(CONVERSATIONS, answer["chat"], answer["chat_prompt"]):
        assert chat == tokenizer.render_conversation({"messages": messages})[0]
        assert prompt == tokenizer.render_for_completion({"messages": messages})
    assert "roles must alternate" in answer["bad_order"]


def test_round_trip_gives_identical_weights(exports):
    home, folders = exports
    for name, tag in [("default", "rand_default"), ("jan29", "rand_jan29"), ("trained", "d2")]:
        original, tokenizer, _ = load_ours(home, tag)
        model, loaded_tokenizer, meta = load_folder(folders[name], "cpu", torch.float32)
        assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
        assert meta["model_tag"] == tag and meta["source"] == "base"
        theirs, ours = model.state_dict(), original.state_dict()
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), name


def test_the_folder_layout(exports):
    home, folders = exports
    jan29 = folders["jan29"]
    index = json.loads((jan29 / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (jan29 / WEIGHTS).exists()  # 0.1 MiB shards
    assert all(os.path.getsize(jan29 / f) < 0.1 * 2**20 + 2**16 or len(load_file(jan29 / f)) == 1 for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_weights(jan29).values())

    bf16 = load_file(folders["bf16"] / WEIGHTS)
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert json.loads((folders["bf16"] / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, _ = load_folder(folders["bf16"], "cpu", torch.float32)
    original, _, _ = load_ours(home, "d2")
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k

    card = (folders["trained"] / "README.md").read_text()
    assert "cannot hold this model (it has no value embeddings, resid/x0 lambdas, smear, backout, QK gain)" in card
    assert "pretraining tokens | 20,480 |" in card  # 40 steps x 512 tokens
    assert "trust_remote_code=True" in card
    generation = json.loads((folders["trained"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1024 - 9 + 4, 1024 - 9]  # <|assistant_end|>, <|bos|>


def test_the_model_card_lists_the_recorded_figures(tmp_path):
    """val bpb from the checkpoint's loop state, CORE and ChatCORE from the evaluations of its step."""
    from picochat.export import model_card

    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=1, n_kv_head=1, n_embd=64)
    model = build_model(config, "cpu", torch.float32)
    meta = {"model_config": config.__dict__, "total_batch_size": 1000, "loop_state": {"val_bpb": 1.23456}}
    ckpt_dir = tmp_path / "sft_checkpoints" / "d2"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "meta_000007.json").write_text("{}")
    (tmp_path / "chat_eval" / "sft_d2").mkdir(parents=True)
    (tmp_path / "chat_eval" / "sft_d2" / "step_000007.json").write_text(
        json.dumps({"metric_name": "ChatCORE", "metric": 0.25, "tasks": {}}))
    os.environ["PICOCHAT_HOME"], saved = str(tmp_path), os.environ.get("PICOCHAT_HOME")
    try:
        card = model_card(model, meta | {"base_checkpoint": {"tag": "d2", "step": 40}},
                          {"source": "sft", "model_tag": "d2", "step": 7}, torch.bfloat16, tmp_path)
    finally:
        os.environ["PICOCHAT_HOME"] = saved or ""
        if saved is None:
            del os.environ["PICOCHAT_HOME"]
    assert "| validation bits per byte (SFT data) | 1.2346 |" in card
    assert "| ChatCORE | 0.2500 |" in card and "| from base model | tag d2, step 40 |" in card
    assert "pretraining tokens" not in card  # an SFT step is not a pretraining step
    assert "# picochat d2 (sft model)" in card and "Weights in bfloat16." in card


def picochat(*args, home: Path):
    return subprocess.run([sys.executable, "-m", "picochat", *args], capture_output=True, text=True,
                          env={**os.environ, "PICOCHAT_HOME": str(home)})


def test_chat_stages_load_an_exported_folder(exports, tmp_path):
    _, folders = exports
    out = picochat("chat-cli", "-i", "hf", "--path", str(folders["trained"]), "-p", "Hello", "-t", "0",
                   "--max-tokens", "8", "--device-type", "cpu", home=tmp_path)  # an empty home: the folder is all
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = picochat("chat-cli", "--path", str(folders["trained"]), "-p", "Hello", home=tmp_path)
    assert out.returncode == 1 and "give it with -i hf" in out.stderr
    out = picochat("chat-cli", "-i", "hf", "-p", "Hello", home=tmp_path)
    assert out.returncode == 1 and "-i hf needs --path" in out.stderr


def test_bad_folders_are_one_line_errors(exports, tmp_path):
    _, folders = exports
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["trained"], corrupt)
    (corrupt / WEIGHTS).write_bytes((corrupt / WEIGHTS).read_bytes()[:1000])
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folders["trained"], no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    bad_tokenizer = tmp_path / "bad_tokenizer"
    shutil.copytree(folders["trained"], bad_tokenizer)
    (bad_tokenizer / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["trained"], damaged)
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**config, "picochat": "?"}))
    cases = [(tmp_path / "missing", "is not a folder"), (damaged, "has no picochat model_config"),
             (foreign, "holds a 'llama' model, not a picochat export"),
             (corrupt, "cannot read the weights"), (no_tokenizer, "tokenizer.json is missing"),
             (bad_tokenizer, "is not a picochat tokenizer")]
    for folder, message in cases:
        out = picochat("chat-cli", "-i", "hf", "--path", str(folder), "-p", "Hi", home=tmp_path)
        assert out.returncode == 1 and message in out.stderr, (folder.name, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_an_existing_output_is_kept_unless_it_is_an_export_and_forced(exports, tmp_path, monkeypatch):
    home, folders = exports
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my work")
    for flags, message in [([], "--force"), (["--force"], "is not a picochat export")]:
        out = picochat("export", "-i", "base", "-g", "d2", "--output", str(target), *flags, home=home)
        assert out.returncode == 1 and message in out.stderr and (target / "notes.txt").read_text() == "my work"
        assert out.stderr.count("\n") == 1, out.stderr

    monkeypatch.setenv("PICOCHAT_HOME", str(home))

    def export(output, force=False):
        return export_stage.run(export_stage.ExportConfig(source="base", model_tag="d2", output=str(output),
                                                          force=force))

    # an earlier export (a shard of an earlier shard count included) is replaced with --force; one
    # the user added a file to is refused and kept
    again = tmp_path / "again"
    shutil.copytree(folders["bf16"], again)
    (again / "model-00001-of-00002.safetensors").write_text("from the earlier export")
    shutil.copytree(again, tmp_path / "added")
    (tmp_path / "added" / "notes.txt").write_text("my notes")
    with pytest.raises(PicochatError, match=r"holds files an export does not write \(notes.txt\)"):
        export(tmp_path / "added", force=True)
    assert (tmp_path / "added" / "notes.txt").exists()

    # beside it, the work folders of a killed export go; those of a live process, or holding other
    # files, or named otherwise, stay
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not process_alive(pid))
    leftovers = {f"again.picochat-tmp-{dead}": WEIGHTS, f"again.picochat-old-{dead}": "config.json",
                 f"again.picochat-tmp-{os.getppid()}": WEIGHTS, f"again.picochat-old-{dead + 1}": "notes.txt",
                 "again.tmp123": WEIGHTS, "again.notes": WEIGHTS}
    for name, file in leftovers.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("half written")
    export(again, force=True)
    assert (again / WEIGHTS).exists() and not (again / "model-00001-of-00002.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("again*")) == sorted(
        ["again", f"again.picochat-tmp-{os.getppid()}", f"again.picochat-old-{dead + 1}", "again.tmp123",
         "again.notes"])

    # $PICOCHAT_HOME and the folders above it are never replaced
    with pytest.raises(PicochatError, match="PICOCHAT_HOME"):
        export(home, force=True)
    assert (home / "base_checkpoints").is_dir()

    # a link needs --force too; then the link is replaced by the folder, and what it pointed to is left alone
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PicochatError, match="is a link: --force"):
        export(link)
    export(link, force=True)
    assert not link.is_symlink() and (link / WEIGHTS).exists() and (target / "notes.txt").exists()

    # a folder that cannot be made is a one-line error
    with pytest.raises(PicochatError, match="cannot write .*NotADirectoryError"):
        export(target / "notes.txt" / "sub")

    # a relative output, "." included
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert export(".") == work and (work / WEIGHTS).exists()


def test_base_eval_of_the_folder_equals_the_checkpoints(exports, pretrain_dir, monkeypatch):
    from picochat.stages import base_eval

    home, folders = exports
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    settings = dict(eval="bpb", device_batch_size=2, split_tokens=256, dataset=str(pretrain_dir), device_type="cpu")
    ours = base_eval.run(base_eval.BaseEvalConfig(model_tag="d2", **settings))
    theirs = base_eval.run(base_eval.BaseEvalConfig(path=str(folders["trained"]), **settings))
    assert theirs["bpb"]["val"] == ours["bpb"]["val"] and theirs["model_tag"] == "hf_trained"
    assert (home / "base_eval" / "hf_trained" / "base_model_000040.json").exists()


def test_a_config_that_is_not_text_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(PicochatError, match="cannot read .*config.json"):
        read_config(tmp_path)
