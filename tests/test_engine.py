"""The KV-cache engine against the slow obvious way: recomputing the whole sequence at every step."""

import pytest
import torch

from picochat.common import PicochatError
from picochat.engine import Engine, KVCache, calculator, sample_next
from picochat.gpt import GPTConfig, build_model

# T=16 with generation past it, so the long layers' window (16) bites too; GQA, value embeddings
# on layers 1 and 3, backout after block 2; short windows are set to 5 where a test asks for them.
CONFIG = GPTConfig(sequence_len=16, vocab_size=1024, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def model_for(preset="default", short_window=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**CONFIG.__dict__, "preset": preset}), "cpu", dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the init, whose zero projections would hide attention and MLPs
        for p in model.parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
        if model.recipe.smear:
            model.smear_lambda.fill_(0.7)
        if model.recipe.backout:
            model.backout_lambda.fill_(0.3)
    if short_window is not None:
        for i, block in enumerate(model.transformer.h):
            if i % 2 == 0:  # the "S" layers of "SL"
                block.attn.window = model.window_sizes[i] = short_window
    return model.eval()


def full_logits(model, rows):
    """Last-position logits of every row, recomputed from scratch."""
    with torch.no_grad():
        return model(torch.tensor(rows))[:, -1]


CASES = [("default", None), ("default", 5), ("jan29", None), ("jan29", 5)]


@pytest.mark.parametrize("preset,short_window", CASES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_cached_logits_equal_full_recompute(preset, short_window, chunk, small_tokenizer):
    """Three different rows prefilled (in one piece or in chunks of 3) and decoded 30 steps past
    the 16-token training length: every step's logits match the full forward."""
    model = model_for(preset, short_window)
    assert model.recipe.smear == (preset == "default")
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 1024, (3, 10), generator=g).tolist()
    cache = KVCache(model, 3, 40)
    engine = Engine(model, small_tokenizer, prefill_chunk=chunk)
    with torch.no_grad():
        logits = engine.prefill(rows, cache)
        for step in range(30):
            torch.testing.assert_close(logits, full_logits(model, rows), atol=1e-5, rtol=1e-5,
                                       msg=f"step {step}")
            column = torch.randint(0, 1024, (3,), generator=g).tolist()
            rows = [r + [t] for r, t in zip(rows, column)]
            logits = model(torch.tensor(column)[:, None], cache=cache)[:, -1]
    assert cache.pos == 40


@pytest.mark.parametrize("preset,short_window", CASES)
@pytest.mark.parametrize("num_samples,chunk", [(1, None), (3, 4)])
def test_greedy_engine_equals_recomputation(preset, short_window, num_samples, chunk, small_tokenizer):
    model = model_for(preset, short_window)
    prompt = [small_tokenizer.get_bos_token_id(), 17, 300, 301, 5, 900, 44]
    engine = Engine(model, small_tokenizer, prefill_chunk=chunk)
    columns = list(engine.generate(prompt, num_samples, max_tokens=30, temperature=0.0))
    ids = list(prompt)
    for column, masks in columns:
        ids.append(int(full_logits(model, [ids])[0].argmax()))
        assert column == [ids[-1]] * num_samples and masks == [1] * num_samples
        if ids[-1] in engine.stop_tokens:
            break
    assert len(ids) - len(prompt) == len(columns)


@pytest.mark.parametrize("preset,short_window", CASES)
@pytest.mark.parametrize("chunk", [None, 4])
def test_left_padded_rows_compute_what_each_row_alone_does(preset, short_window, chunk, small_tokenizer):
    """Prompts of 3, 9 and 6 tokens left-padded into one cache, prefilled and decoded 25 steps
    (past the 16-token training length, through the windows): each row's logits match the full
    forward of that row alone, which never saw padding."""
    model = model_for(preset, short_window)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (3, 9, 6)]
    longest = max(map(len, rows))
    pad = torch.tensor([longest - len(r) for r in rows])
    cache = KVCache(model, 3, longest + 25, pad)
    engine = Engine(model, small_tokenizer, prefill_chunk=chunk)
    with torch.no_grad():
        logits = engine.prefill([[0] * (longest - len(r)) + r for r in rows], cache)
        for step in range(25):
            assert torch.isfinite(logits).all()
            alone = torch.cat([full_logits(model, [r]) for r in rows])
            torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4, msg=f"step {step}")
            column = torch.randint(0, 1024, (3,), generator=g).tolist()
            rows = [r + [t] for r, t in zip(rows, column)]
            logits = model(torch.tensor(column)[:, None], cache=cache)[:, -1]


def test_complete_batches_prompts_as_one_at_a_time(small_tokenizer):
    """Greedy completions of several prompts in one batch (2 samples each) are the ones each
    prompt gets alone; a 7-token prompt of equal length takes the unpadded path."""
    model = model_for("default", 5)
    engine = Engine(model, small_tokenizer)
    bos = small_tokenizer.get_bos_token_id()
    prompts = [[bos, 5, 6], [bos, 17, 300, 301, 5, 900, 44], [bos, 9, 9, 9, 2]]
    together = engine.complete(prompts, 2, max_tokens=20, temperature=0.0)
    for prompt, (sequences, masks) in zip(prompts, together):
        alone = engine.generate_batch(prompt, 1, max_tokens=20, temperature=0.0)
        assert sequences == alone[0] * 2 and masks == alone[1] * 2
    assert engine.complete([prompts[1]] * 2, 1, max_tokens=5, temperature=0.0) == [
        engine.generate_batch(prompts[1], 1, max_tokens=5, temperature=0.0)] * 2


def test_sampled_rows_match_recomputation_row_by_row(small_tokenizer):
    """Sampled rows differ from each other; teacher-forcing their tokens through a batch cache
    gives each row's own full-forward logits."""
    model = model_for("default", 5)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)  # flatter distributions, so the rows diverge
    engine = Engine(model, small_tokenizer)
    prompt = [small_tokenizer.get_bos_token_id(), 7, 8, 9]
    sequences, _ = engine.generate_batch(prompt, 4, max_tokens=25, temperature=1.0, seed=5)
    assert len({tuple(s) for s in sequences}) == 4
    n = min(len(s) for s in sequences)
    cache = KVCache(model, 4, n)
    rows = [s[:len(prompt)] for s in sequences]
    with torch.no_grad():
        logits = engine.prefill(rows, cache)
        for t in range(len(prompt), n):
            torch.testing.assert_close(logits, full_logits(model, rows), atol=1e-5, rtol=1e-5)
            column = [s[t] for s in sequences]
            rows = [r + [c] for r, c in zip(rows, column)]
            logits = model(torch.tensor(column)[:, None], cache=cache)[:, -1]


def test_sampling_is_seeded_and_respects_top_k(small_tokenizer):
    model = model_for()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    engine = Engine(model, small_tokenizer)
    run = lambda **kw: engine.generate_batch([3, 4], 2, max_tokens=12, **kw)[0]
    assert run(temperature=1.0, seed=1) == run(temperature=1.0, seed=1)
    assert run(temperature=1.0, seed=1) != run(temperature=1.0, seed=2)
    assert run(temperature=0.7, top_k=1, seed=3) == run(temperature=0.0)  # top-1 is greedy
    logits = full_logits(model, [[3, 4]]).expand(64, -1)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    drawn = sample_next(logits, torch.Generator().manual_seed(0), 2.0, 5)
    assert set(drawn.tolist()) <= allowed and len(set(drawn.tolist())) > 1


class Scripted:
    """A real GPT whose next-token logits are pushed towards a script, indexed by the position
    being generated, so a test can make a model call the tool."""

    def __init__(self, model, prompt_len, script):
        self.model, self.prompt_len, self.script = model, prompt_len, script
        self.config, self.compute_dtype, self.rotary_len = model.config, model.compute_dtype, model.rotary_len
        self.get_device = model.get_device

    def __call__(self, idx, cache=None):
        logits = self.model(idx, cache=cache).clone()
        i = cache.pos - self.prompt_len  # the index of the token these logits choose
        if i < len(self.script):
            logits[:, -1, self.script[i]] += 100.0
        return logits


def test_stop_tokens_end_rows(small_tokenizer):
    """Rows that say <|assistant_end|> stop after one column; generate_batch leaves it out."""
    end = small_tokenizer.encode_special("<|assistant_end|>")
    engine = Engine(Scripted(model_for(), 2, [end] * 10), small_tokenizer)
    assert list(engine.generate([1, 2], 3, max_tokens=10, temperature=0.0)) == [([end] * 3, [1, 1, 1])]
    assert engine.generate_batch([1, 2], 2, max_tokens=10, temperature=0.0) == ([[1, 2], [1, 2]], [[0, 0], [0, 0]])


def test_prompt_must_fit(small_tokenizer):
    engine = Engine(model_for(), small_tokenizer)
    with pytest.raises(PicochatError, match="leaves no room"):
        list(engine.generate([1] * 160, max_tokens=4))
    # max_tokens is cut to what the rotary table allows
    assert len(list(engine.generate([1] * 155, max_tokens=50, temperature=0.0))) <= 5


def test_tool_output_is_forced_with_mask_zero(small_tokenizer):
    tok = small_tokenizer
    S = tok.encode_special
    prompt = [tok.get_bos_token_id(), S("<|user_start|>"), *tok.encode("What is 12*34?"), S("<|user_end|>"),
              S("<|assistant_start|>")]
    call = [S("<|python_start|>"), *tok.encode("12*34"), S("<|python_end|>")]
    forced = [S("<|output_start|>"), *tok.encode("408"), S("<|output_end|>")]
    after = tok.encode(" so 408.")
    # where the tool's output goes, the script says something else: only forcing can put 408 there
    wrong = tok.encode("999")[:1] * len(forced)
    script = call + wrong + after + [S("<|assistant_end|>")]
    engine = Engine(Scripted(model_for(), len(prompt), script), tok)
    [sequence], [mask] = engine.generate_batch(prompt, 1, max_tokens=60, temperature=0.0)
    assert sequence == prompt + call + forced + after
    assert mask == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * len(after)


def test_calculator():
    assert calculator("12*34") == "408"
    assert calculator("1,234 + 1") == "1235"
    assert calculator("(7 - 2) / 4") == "1.25"
    assert calculator("'strawberry'.count('r')") == "3"
    for refused in ("2**100", "__import__('os')", "open('x')", "'ab'.upper()", "1/0"):
        assert calculator(refused) is None, refused


def test_cast_for_inference_keeps_the_outputs(small_tokenizer):
    """bf16 matrices stored once give the logits that the per-matmul cast of training gives."""
    model = model_for(dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        before = model(ids)
    model.cast_for_inference()
    assert model.transformer.h[0].attn.c_q.weight.dtype == torch.bfloat16
    assert model.resid_lambdas.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """Probabilities 0.4, 0.3, 0.2, 0.1: top_p 0.5 keeps the first two (0.4 < 0.5 before the
    second), top_p 0.4 only the first; with top_k 3 first, the same."""
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    for top_k in (None, 3):
        counts = torch.bincount(sample_next(logits, rng, 1.0, top_k, 0.5), minlength=4).tolist()
        assert counts[0] == counts[2] == 0 and abs(counts[1] / counts[3] - 4 / 3) < 0.15
        assert set(sample_next(logits, rng, 1.0, top_k, 0.4).tolist()) == {1}
    # top_p 1 and None draw exactly what plain sampling draws
    draw = lambda top_p: sample_next(logits[:50], torch.Generator().manual_seed(1), 0.7, None, top_p).tolist()
    assert draw(1.0) == draw(None)


def test_logprobs_are_the_models_distribution(small_tokenizer):
    model = model_for("default", 5)
    engine = Engine(model, small_tokenizer)
    prompt = [small_tokenizer.get_bos_token_id(), 17, 300, 301]
    ids = list(prompt)
    for column, _, info in engine.generate(prompt, 2, max_tokens=6, temperature=0.0, logprobs=3):
        logp = torch.log_softmax(full_logits(model, [ids])[0], dim=-1)
        for token, (chosen, best) in zip(column, info):
            assert chosen == pytest.approx(logp[token].item(), abs=1e-4)
            assert [t for t, _ in best] == torch.topk(logp, 3).indices.tolist() and best[0][0] == token
        ids.append(column[0])
