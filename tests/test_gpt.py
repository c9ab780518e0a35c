"""The GPT model: sizing, accounting, initialization, and the forward pass against a slow
reference written out from the architecture description."""

import math

import pytest
import torch
import torch.nn.functional as F

from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig, build_model, config_from_depth, window_sizes
from picochat.recipes import RECIPES

# A small model that still exercises every feature: GQA (4 query heads on 2 kv heads), a sliding
# window that bites (S = ceil(256/4/128)*128 = 128 < T = 256), value embeddings on layers 1 and 3,
# backout after block 2, and a vocab that needs padding (500 -> 512).
TINY = GPTConfig(sequence_len=256, vocab_size=500, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, window_pattern="SL")


def meta_model(config):
    with torch.device("meta"):
        return GPT(config)


def tiny(config=TINY, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_model(config, "cpu", dtype)


def perturbed(model, seed=1):
    """Move every parameter off its init (zero projections would hide attention and MLP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
        if hasattr(model, "smear_lambda"):
            model.smear_lambda.fill_(0.7)
            model.backout_lambda.fill_(0.3)
    return model


# ---------------------------------------------------------------------------
# Sizing and accounting (meta device: no memory, instant)


# depth: (wte, value_embeds, lm_head, transformer_matrices, scalars, total), FLOPs/token, from the spec's tables
TABLE = {
    12: ((25_165_824, 150_994_944, 25_165_824, 84_935_088, 50, 286_261_730), "7.597e+08"),
    20: ((41_943_040, 419_430_400, 41_943_040, 393_217_200, 66, 896_533_746), "2.886e+09"),
    24: ((50_331_648, 603_979_776, 50_331_648, 679_478_976, 74, 1_384_122_122), "4.775e+09"),
    26: ((54_525_952, 708_837_376, 54_525_952, 863_897_580, 78, 1_681_786_938), "5.991e+09"),
}
KEYS = ("wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total")


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_parameter_and_flops_tables(depth):
    counts, flops = TABLE[depth]
    model = meta_model(config_from_depth(depth, 32768))
    assert model.num_scaling_params() == dict(zip(KEYS, counts))
    assert f"{model.estimate_flops():.3e}" == flops


def test_d24_flops_exact():
    # matmul weights: 679,478,976 block + 50,331,648 lm_head + 24 smear_gate = 729,810,648;
    # attention: 12 * 12 heads * 128 * (18 layers * 512 + 6 layers * 2048)
    assert meta_model(config_from_depth(24, 32768)).estimate_flops() == 6 * 729_810_648 + 12 * 1536 * 21504


def test_jan29_d24_numbers():
    model = meta_model(config_from_depth(24, 32768, preset="jan29"))
    counts = model.num_scaling_params()
    assert counts["total"] == 1_384_124_976
    assert counts["transformer_matrices"] == 679_481_856
    assert counts["scalars"] == 48
    # 6 * (679,481,856 + 50,331,648) + 12 * 1536 * (18 * 1024 + 6 * 2048): S = T/2 in that recipe
    assert model.estimate_flops() == 4_945_112_064
    assert f"{model.estimate_flops():.4e}" == "4.9451e+09"
    assert not hasattr(model, "smear_gate") and not hasattr(model, "backout_lambda")


@pytest.mark.parametrize("depth,n_embd,n_head", [(1, 128, 1), (3, 256, 2), (5, 384, 3), (12, 768, 6), (13, 896, 7)])
def test_width_from_depth_rounds_up_to_whole_heads(depth, n_embd, n_head):
    c = config_from_depth(depth, 1000)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (n_embd, n_head, n_head, depth)


def test_odd_depth_model_runs():
    config = config_from_depth(3, 300, max_seq_len=64, aspect_ratio=32, head_dim=32)  # width 96, 3 heads
    model = tiny(config)
    assert sorted(model.value_embeds.keys()) == ["0", "2"]  # the last layer and every second one back
    loss = model(torch.randint(0, 300, (2, 64)), torch.randint(0, 300, (2, 64)))
    loss.backward()
    assert torch.isfinite(loss)


def test_window_pattern_and_value_embedding_layers():
    c = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert window_sizes(c) == [512, 512, 512, 2048, 512, 2048]  # tiled, last layer forced long
    assert window_sizes(GPTConfig(sequence_len=2048, n_layer=3, window_pattern="S")) == [512, 512, 2048]
    assert window_sizes(GPTConfig(sequence_len=1000, n_layer=2, window_pattern="s")) == [256, 1000]
    assert window_sizes(GPTConfig(sequence_len=2048, n_layer=4, preset="jan29")) == [1024, 1024, 1024, 2048]
    assert sorted(meta_model(c).value_embeds.keys()) == ["1", "3", "5"]


def test_vocab_is_padded_and_logits_sliced():
    model = tiny()
    assert model.transformer.wte.weight.shape[0] == 512 and model.lm_head.weight.shape[0] == 512
    assert model.value_embeds["1"].weight.shape == (512, 64)
    assert model(torch.randint(0, 500, (1, 8))).shape == (1, 8, 500)


@pytest.mark.parametrize("bad", [dict(preset="feb30"), dict(window_pattern="SXL"), dict(window_pattern=""),
                                 dict(n_kv_head=3), dict(n_head=5), dict(n_embd=16, n_head=1, n_kv_head=1)])
def test_bad_configs_are_user_errors(bad):
    fields = dict(TINY.__dict__, **bad)
    with pytest.raises(PicochatError):
        meta_model(GPTConfig(**fields))


# ---------------------------------------------------------------------------
# Initialization


def test_init_weights_sets_every_tensor():
    """Poison everything after to_empty; init_weights must overwrite all of it, and the result
    must equal a normal build with the same seed."""
    with torch.device("meta"):
        model = GPT(TINY)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    reference = tiny(seed=0)
    for (name, t), (_, want) in zip(model.state_dict(keep_vars=True).items(),
                                    reference.state_dict(keep_vars=True).items()):
        assert torch.isfinite(t).all(), name
        assert torch.equal(t, want), name
    for name in ("cos", "sin"):
        assert torch.isfinite(getattr(model, name)).all() and torch.equal(getattr(model, name),
                                                                           getattr(reference, name))


def check_uniform(w, lo, hi):
    assert w.min() >= lo and w.max() <= hi
    assert w.min() < lo + 0.02 * (hi - lo) and w.max() > hi - 0.02 * (hi - lo)  # fills the range
    assert w.std().item() == pytest.approx((hi - lo) / math.sqrt(12), rel=0.03)


def test_init_statistics_default():
    config = GPTConfig(sequence_len=128, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
    model = tiny(config)
    s = math.sqrt(3 / 256)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.01)
    assert model.transformer.wte.weight.mean().abs() < 0.005
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.01)
    for block in model.transformer.h:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            check_uniform(lin.weight, -s, s)
        check_uniform(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    gates = torch.cat([model.transformer.h[i].attn.ve_gate.weight.flatten() for i in (1, 3)])
    assert gates.shape == (2 * 2 * 12,) and gates.min() >= 0 and gates.max() <= 0.02 and gates.max() > 0.015
    assert model.transformer.h[0].attn.ve_gate is None
    for emb in model.value_embeds.values():
        check_uniform(emb.weight, -s, s)
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    w = model.smear_gate.weight
    assert w.shape == (1, 24) and w.min() >= 0 and w.max() <= 0.02 and w.max() > 0.01
    # rotary tables: theta 100,000, head_dim 128, 10x the sequence length
    assert model.cos.shape == (1, 1280, 1, 64)
    t, j = 1000, 5
    assert model.cos[0, t, 0, j].item() == pytest.approx(math.cos(t * 100_000 ** (-2 * j / 128)), abs=1e-5)
    assert model.sin[0, t, 0, j].item() == pytest.approx(math.sin(t * 100_000 ** (-2 * j / 128)), abs=1e-5)


def test_init_statistics_jan29():
    config = GPTConfig(sequence_len=128, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=256,
                       preset="jan29")
    model = tiny(config)
    s = math.sqrt(3 / 256)
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.01)
    check_uniform(model.transformer.h[0].mlp.c_fc.weight, -s, s)
    assert model.transformer.h[3].attn.ve_gate.weight.shape == (2, 32)
    assert not model.transformer.h[3].attn.ve_gate.weight.any()
    assert torch.equal(model.resid_lambdas, torch.ones(4))
    torch.testing.assert_close(model.x0_lambdas, torch.full((4,), 0.1))
    t, j = 100, 3
    assert model.cos[0, t, 0, j].item() == pytest.approx(math.cos(t * 10_000 ** (-2 * j / 128)), abs=1e-5)


@pytest.mark.parametrize("dtype,embed_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_storage_dtypes(dtype, embed_dtype):
    model = tiny(dtype=dtype)
    assert model.transformer.wte.weight.dtype == embed_dtype
    assert all(e.weight.dtype == embed_dtype for e in model.value_embeds.values())
    assert model.lm_head.weight.dtype == torch.float32  # fp32 master weights
    assert model.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    assert model.resid_lambdas.dtype == torch.float32 and model.cos.dtype == dtype


def test_attention_summary_names_the_backends():
    out = tiny().attention_summary()
    assert "window 128 (layers 0,2)" in out and "SLOW" in out
    assert "full context (layers 1,3): sdpa (causal)" in out


# ---------------------------------------------------------------------------
# Forward pass against a slow reference


def rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def reference_logits(model, idx, *, theta, qk_scale, gate_channels, gate_range, smear, backout, windows):
    """The architecture written out step by step in float64 from the model's parameters."""
    P = {name: p.detach().double() for name, p in model.named_parameters()}
    c = model.config
    B, T = idx.shape
    H, Hkv, C = c.n_head, c.n_kv_head, c.n_embd
    D = C // H
    x = rms(P["transformer.wte.weight"][idx])
    if smear:
        smeared = x.clone()
        for t in range(1, T):  # uses the previous position's pre-smear value
            gate = P["smear_lambda"][0] * torch.sigmoid(x[:, t, :24] @ P["smear_gate.weight"][0])
            smeared[:, t] = x[:, t] + gate[:, None] * x[:, t - 1]
        x = smeared
    x0 = x
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2) / D)[None, :]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rope(u):
        u1, u2 = u[..., : D // 2], u[..., D // 2 :]
        return torch.cat([u1 * cos + u2 * sin, -u1 * sin + u2 * cos], dim=-1)

    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for i in range(c.n_layer):
        W = lambda name, i=i: P[f"transformer.h.{i}.{name}.weight"]
        x = P["resid_lambdas"][i] * x + P["x0_lambdas"][i] * x0
        h = rms(x)
        q = (h @ W("attn.c_q").T).view(B, T, H, D)
        k = (h @ W("attn.c_k").T).view(B, T, Hkv, D)
        v = (h @ W("attn.c_v").T).view(B, T, Hkv, D)
        if f"value_embeds.{i}.weight" in P:
            ve = P[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
            gate = gate_range * torch.sigmoid(h[..., :gate_channels] @ W("attn.ve_gate").T)  # (B, T, Hkv)
            v = v + gate[..., None] * ve
        q, k = rms(rope(q)) * qk_scale, rms(rope(k)) * qk_scale
        visible = (cols <= rows) & (rows - cols <= windows[i])
        heads = []
        for hd in range(H):
            kv = hd // (H // Hkv)
            scores = (q[:, :, hd] @ k[:, :, kv].transpose(1, 2)) / math.sqrt(D)
            heads.append(scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[:, :, kv])
        x = x + torch.stack(heads, dim=2).reshape(B, T, C) @ W("attn.c_proj").T
        x = x + torch.relu(rms(x) @ W("mlp.c_fc").T).square() @ W("mlp.c_proj").T
        if i == c.n_layer // 2:
            mid = x
    if backout:
        x = x - P["backout_lambda"][0] * mid
    logits = (rms(x) @ P["lm_head.weight"].T)[..., : c.vocab_size]
    return 15 * torch.tanh(logits / 15)


def test_forward_matches_reference_default():
    model = perturbed(tiny())
    idx = torch.randint(0, 500, (2, 256), generator=torch.Generator().manual_seed(2))
    want = reference_logits(model, idx, theta=100_000, qk_scale=1.2, gate_channels=12, gate_range=3.0, smear=True,
                            backout=True, windows=[128, 256, 128, 256])
    with torch.no_grad():
        got = model(idx)
    assert got.dtype == torch.float32 and got.shape == (2, 256, 500)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_forward_matches_reference_jan29():
    config = GPTConfig(**dict(TINY.__dict__, preset="jan29", n_layer=3))
    model = perturbed(tiny(config))
    idx = torch.randint(0, 500, (2, 256), generator=torch.Generator().manual_seed(3))
    want = reference_logits(model, idx, theta=10_000, qk_scale=1.0, gate_channels=32, gate_range=2.0, smear=False,
                            backout=False, windows=[128, 256, 256])
    with torch.no_grad():
        got = model(idx)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_bf16_compute_tracks_fp32():
    idx = torch.randint(0, 500, (2, 256), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = perturbed(tiny(dtype=torch.float32))(idx)
        half = perturbed(tiny(dtype=torch.bfloat16))(idx)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (half - full).abs().max() < 0.15
    assert (half - full).abs().mean() < 0.02


def test_softcap_bounds_logits():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # raw logits in the hundreds
        logits = model(torch.randint(0, 500, (2, 32)))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.9


def test_loss_is_cross_entropy_of_logits():
    model = perturbed(tiny())
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 500, (2, 64), generator=g)
    targets = torch.randint(0, 500, (2, 64), generator=g)
    targets[0, :10] = -1  # ignored positions
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
    want = F.cross_entropy(logits.view(-1, 500), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, want)
    assert per_token.shape == (128,)
    assert not per_token[:10].any()
    torch.testing.assert_close(per_token[targets.view(-1) >= 0].mean(), want)


def test_backward_reaches_every_parameter():
    model = perturbed(tiny())
    idx = torch.randint(0, 500, (2, 256))
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.any(), name


def test_compiled_forward_matches_eager():
    config = GPTConfig(sequence_len=256, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = perturbed(tiny(config))
    idx = torch.randint(0, 300, (2, 256))
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model, dynamic=False)(idx)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_model_with_windows_is_one_graph():
    """build_model pins the training length's window masks, so the compiled forward is one graph
    (building a mask mid-trace would split it at every windowed layer), and evaluating at many
    other lengths, which churns the mask cache, does not make it recompile."""
    from torch._dynamo.utils import counters

    from picochat import attention as A

    config = GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                       window_pattern="SL")
    model = perturbed(tiny(config))
    assert model.window_sizes == [128, 256, 128, 256]  # the short window cuts context at T=256
    compiled = torch.compile(model, dynamic=False)
    idx = torch.randint(0, 300, (2, 256))
    counters.clear()
    with torch.no_grad():
        first = compiled(idx)
        for T in range(100, 100 + A.MAX_CACHED_MASKS + 4):
            model(idx[:, :T])  # eager, as evaluation runs: new masks, old ones evicted
        again = compiled(idx)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, model(idx), atol=1e-5, rtol=1e-5)


def test_packed_forward_equals_separate_sequences():
    """Three sequences sharing a 50-token prefix, packed into one row: each packed token's logits
    equal the same token's logits when its sequence runs alone (RoPE positions, windows, smear's
    previous token, value embeddings, backout). TINY's short window is 128 tokens."""
    from picochat.attention import Packing

    for preset in ("default", "jan29"):
        config = GPTConfig(sequence_len=256, vocab_size=500, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                           window_pattern="SL", preset=preset)
        model = perturbed(tiny(config))
        assert model.window_sizes[0] < 150
        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(0, 500, (50,), generator=g)
        rests = [torch.randint(0, 500, (n,), generator=g) for n in (120, 7, 1)]
        tokens, positions, segments, prev, where = prefix.tolist(), list(range(50)), [0] * 50, [], []
        for s, rest in enumerate(rests, start=1):
            where.append(list(range(50)) + list(range(len(tokens), len(tokens) + len(rest))))
            tokens += rest.tolist()
            positions += range(50, 50 + len(rest))
            segments += [s] * len(rest)
        prev = list(range(len(tokens)))
        for w in where:
            for p in range(1, len(w)):
                prev[w[p]] = w[p - 1]
        packing = Packing(*(torch.tensor([x]) for x in (positions, segments, prev)))
        with torch.no_grad():
            packed = model(torch.tensor([tokens]), packing=packing)
            for rest, w in zip(rests, where):
                alone = model(torch.cat([prefix, rest])[None])
                torch.testing.assert_close(packed[0, w], alone[0], atol=2e-5, rtol=1e-5, msg=preset)


# ---------------------------------------------------------------------------
# Optimizer groups


def test_optimizer_groups_default():
    model = tiny()
    dls = (128 / 768) ** -0.5
    groups = model.optimizer_groups(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                    scalar_lr=0.5)
    adamw = [g for g in groups if g["kind"] == "adamw"]
    expected = [  # params, lr, betas, weight decay
        ([model.lm_head.weight], 0.008 * dls, (0.8, 0.96), 0.01),
        ([model.transformer.wte.weight], 0.3 * dls, (0.8, 0.995), 0.001),
        ([model.value_embeds["1"].weight, model.value_embeds["3"].weight], 0.15 * dls, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], 0.005, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], 0.5, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    assert len(adamw) == len(expected)
    for g, (params, lr, betas, wd) in zip(adamw, expected):
        assert [id(p) for p in g["params"]] == [id(p) for p in params]
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"]
        assert g["betas"] == betas and g["weight_decay"] == wd and g["eps"] == 1e-10
    muon = [g for g in groups if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(shapes) and len(set(shapes)) == len(shapes)
    # c_q (128x128), c_k/c_v (64x128), c_proj (128x128), c_fc (512x128), mlp c_proj (128x512), ve_gate (2x12)
    assert shapes == [(2, 12), (64, 128), (128, 128), (128, 512), (512, 128)]
    for g in muon:
        assert all(p.shape == g["params"][0].shape for p in g["params"])
        assert (g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.02, 0.95, 5, 0.9, 0.28)
    block_ids = {id(p) for p in model.transformer.h.parameters()}
    assert sorted(id(p) for g in muon for p in g["params"]) == sorted(block_ids)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def test_optimizer_groups_jan29():
    model = tiny(GPTConfig(**dict(TINY.__dict__, preset="jan29")))
    dls = (128 / 768) ** -0.5
    groups = model.optimizer_groups(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2,
                                    scalar_lr=0.5)
    adamw = [g for g in groups if g["kind"] == "adamw"]
    assert [g["lr"] for g in adamw] == pytest.approx([0.004 * dls, 0.3 * dls, 0.3 * dls, 0.005, 0.5])
    assert [g["betas"] for g in adamw] == [(0.8, 0.95)] * 4 + [(0.96, 0.95)]
    assert all(g["weight_decay"] == 0.0 for g in adamw)
    assert all(g["beta2"] == 0.95 for g in groups if g["kind"] == "muon")
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())


def test_setup_optimizer_builds_muon_adamw():
    optim = pytest.importorskip("picochat.optim")
    model = tiny()
    opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                scalar_lr=0.5)
    assert isinstance(opt, optim.MuonAdamW)
    assert len(opt.param_groups) == len(model.optimizer_groups())
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


# ---------------------------------------------------------------------------
# Same seed, same weights as the reference (spec 5.3): its order of draws, its float arithmetic


@pytest.mark.parametrize("preset", ["default", "jan29"])
def test_init_draws_in_the_reference_order(preset):
    config = GPTConfig(**dict(TINY.__dict__, preset=preset))
    model = tiny(config, seed=42)
    r, d, L = RECIPES[preset], config.n_embd, config.n_layer
    s = math.sqrt(3 / d)
    V = model.padded_vocab
    kv = config.n_kv_head * (d // config.n_head)
    # the reference's sequence, drawn by hand from the same seed
    torch.manual_seed(42)
    draw = lambda *shape: torch.empty(*shape)
    want = {"transformer.wte.weight": draw(V, d).normal_(0, r.wte_std),
            "lm_head.weight": draw(V, d).normal_(0, 0.001)}
    for i in range(L):
        for name in ("c_q", "c_k", "c_v"):
            rows = d if name == "c_q" else kv
            want[f"transformer.h.{i}.attn.{name}.weight"] = draw(rows, d).uniform_(-s, s)
        want[f"transformer.h.{i}.mlp.c_fc.weight"] = draw(4 * d, d).uniform_(-r.c_fc_scale * s, r.c_fc_scale * s)
    if r.smear:
        want["smear_gate.weight"] = draw(1, 24).uniform_(0, 0.02)
    for i in model.value_embeds:
        want[f"value_embeds.{i}.weight"] = draw(V, kv).uniform_(-s, s)
    for i, block in enumerate(model.transformer.h):
        if block.attn.ve_gate is not None:
            want[f"transformer.h.{i}.attn.ve_gate.weight"] = draw(config.n_kv_head, r.ve_gate_channels).uniform_(
                0, r.ve_gate_init)
    state = model.state_dict()
    assert len(want) > 3 * L
    for name, value in want.items():
        assert torch.equal(state[name], value), name
    # and nothing else drawn: the projections start at zero
    assert all(not state[f"transformer.h.{i}.{p}.c_proj.weight"].any() for i in range(L) for p in ("attn", "mlp"))


def test_lambda_ramps_are_computed_in_python_floats():
    for L in (1, 4, 12, 24):
        config = GPTConfig(**dict(TINY.__dict__, n_layer=L))
        model = tiny(config)
        # spec 5.3: 1.15 - 0.10 i / (L - 1) and 0.20 - 0.15 i / (L - 1), each rounded once to fp32
        resid = torch.tensor([1.15 - 0.10 * i / max(L - 1, 1) for i in range(L)], dtype=torch.float32)
        x0 = torch.tensor([0.20 - 0.15 * i / max(L - 1, 1) for i in range(L)], dtype=torch.float32)
        assert torch.equal(model.resid_lambdas.data, resid) and torch.equal(model.x0_lambdas.data, x0)
    assert model.x0_lambdas[0] == torch.tensor(0.20) and model.x0_lambdas[-1] == torch.tensor(0.05)
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0.0


def test_rotary_frequencies_match_the_reference_formula():
    model = tiny()
    head_dim = TINY.n_embd // TINY.n_head
    i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    inv_freq = 1 / (RECIPES["default"].rope_theta ** (i / head_dim))  # as the reference writes it
    angles = torch.outer(torch.arange(model.rotary_len, dtype=torch.float32), inv_freq)
    assert torch.equal(model.cos[0, :, 0, :], angles.cos()) and torch.equal(model.sin[0, :, 0, :], angles.sin())
    # the algebraically equal theta^(-i/d) is not the same in fp32, so the formula matters
    assert not torch.equal(inv_freq, RECIPES["default"].rope_theta ** (-i / head_dim))
