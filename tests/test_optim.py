"""MuonAdamW against independent truths: torch.optim.AdamW, the scalar Polar Express
polynomial, a float64 per-matrix transcription of the Muon update, hand-computed
cautious weight decay, and a 1-process run on the full batch for the 2-process
(gloo) ZeRO-2 path."""

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch._dynamo.utils import counters

from picochat.common import PicochatError
from picochat.optim import POLAR_EXPRESS_COEFFS, MuonAdamW, polar_express

# ---------------------------------------------------------------------------
# A toy model exercising every path: an AdamW tensor big enough to be sharded (64x32),
# a small one that is all-reduced (8,), a Muon stack of three wide matrices (K=3 does
# not split evenly over 2 ranks) and a single tall matrix (rank 1 of 2 owns none of it).


def toy_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (8,), (16, 32), (16, 32), (16, 32), (48, 16)]
    return [torch.nn.Parameter(torch.randn(s, generator=g) / math.sqrt(s[-1])) for s in shapes]


def toy_batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, 8, generator=g)  # a learnable target: a fixed function of the token
    idx = torch.randint(0, 64, (n,), generator=g)
    return idx, table[idx]


def toy_loss(params, idx, target):
    emb, bias, wa, wb, wc, tall = params
    x = emb[idx]
    h = torch.tanh(x @ wa.T) * torch.tanh(x @ wb.T) + torch.tanh(x @ wc.T)
    y = torch.tanh(h @ tall.T).view(len(idx), 8, 6).sum(-1) + bias
    return (y - target).square().mean()


def toy_optimizer(params, muon_lr=0.02, **options):
    emb, bias, wa, wb, wc, tall = params
    # AdamW's eps is large enough to matter, so a gradient summed over ranks but not divided
    # by the world size changes the result (Muon and small-eps AdamW are scale invariant)
    muon = dict(kind="muon", lr=muon_lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1)
    return MuonAdamW([
        dict(kind="adamw", params=[emb, bias], lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01),
        dict(muon, params=[wa, wb, wc]),
        dict(muon, params=[tall]),
    ], **options)


def train(params, opt, batch, steps):
    losses = []
    for _ in range(steps):
        loss = toy_loss(params, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------
# AdamW


def test_adamw_matches_torch_adamw():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(64, 32, generator=g), torch.randn(8, generator=g), torch.randn(32, 32, generator=g)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    # eps comparable to sqrt(v) makes the bias-correction form matter (pitfall: eps added
    # to the uncorrected sqrt(v) gives visibly different steps here)
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours, **hp)])
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hp)
    for step in range(10):
        for a, b in zip(ours, ref):
            a.grad = 1e-3 * torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        lr = 0.01 * (1 - step / 10)  # a schedule, as base_train applies one
        opt.param_groups[0]["lr"] = ref_opt.param_groups[0]["lr"] = lr
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert opt.state[a]["step"] == 10
    assert opt.param_groups[0]["initial_lr"] == 0.01


def test_adamw_bf16_param_keeps_bf16_state_and_fp32_math():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32, generator=g).bfloat16())
    p0 = p.detach().float()
    grad = torch.randn(64, 32, generator=g).bfloat16()
    p.grad = grad
    lr, wd, eps = 0.01, 0.1, 1e-10
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=lr, betas=(0.8, 0.95), eps=eps, weight_decay=wd)])
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    # after one bias-corrected step m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps)
    gf = grad.float()
    expected = p0 * (1 - lr * wd) - lr * gf / (gf.abs() + eps)
    torch.testing.assert_close(p.float(), expected.bfloat16().float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Polar Express


def scalar_polar_express(s, ns_steps=5):
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("norm_factor", [1.01, 1.02])  # the current reference's, Jan-29's
@pytest.mark.parametrize("shape", [(32, 96), (64, 64), (96, 32)], ids=["wide", "square", "tall"])
def test_polar_express_singular_values(shape, norm_factor):
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_in = torch.linalg.svdvals(x)
    y = polar_express(x.float(), 5, norm_factor).double()
    s_out = torch.linalg.svdvals(y)
    # the iteration maps each singular value, divided by norm_factor*|X|_F, through the same odd
    # polynomial; that polynomial wiggles around 1, so compare the values as sorted sets
    s_norm = s_in / (norm_factor * torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)[..., 0] + 1e-6)
    expected = scalar_polar_express(s_norm).sort(dim=-1).values
    torch.testing.assert_close(s_out.sort(dim=-1).values, expected, rtol=1e-4, atol=1e-5)
    # the coefficients were designed for inputs in [1e-3, 1]; those land in [0.8589, 1.1411]
    designed = s_norm >= 1e-3
    if shape[0] != shape[1]:  # a random rectangular matrix is well conditioned: everything qualifies
        assert designed.all()
    else:  # a random square one has tiny singular values that 5 iterations cannot lift
        assert 0.8 < designed.float().mean() < 1
    assert s_out[designed].min() > 0.858 and s_out[designed].max() < 1.142
    # singular vectors are unchanged: Uᵀ Y V is diagonal
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    core = u.mT @ y @ vh.mT
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-4


def test_polar_express_bf16_band():
    x = torch.randn(4, 32, 96, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(polar_express(x.bfloat16(), 5).float())
    assert s.min() > 0.84 and s.max() < 1.16  # measured 0.849 .. 1.145
    # the optimizer passes the normalization factor as a 0-d fp32 tensor: in bf16 it must act
    # like the Python float (bf16 would round 1.01 to 1.0078), not be rounded first
    x = x.bfloat16()
    for factor in (1.01, 1.02):
        assert torch.equal(polar_express(x, 5, torch.tensor(factor)), polar_express(x, 5, factor))


def test_fp16_muon_dtype_maps_to_fp32():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    group = dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    assert MuonAdamW([group], muon_dtype=torch.float16).muon_dtype == torch.float32
    assert MuonAdamW([group], muon_dtype=torch.bfloat16).muon_dtype == torch.bfloat16


def test_param_group_validation():
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 8))
    muon = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(muon, params=[a, b])])
    with pytest.raises(ValueError, match="ns_steps"):
        MuonAdamW([dict(muon, params=[a], ns_steps=6)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[a], lr=0.1)])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([dict(kind="adamw", params=[a], lr=0.1)])


# ---------------------------------------------------------------------------
# Muon


def reference_muon(p, grads, lr, momentum, wd, beta2, steps, norm_factor=1.01, muon_eq=True, muon_plus=True):
    """The Muon update transcribed step by step, one matrix at a time, in float64."""
    p = p.double().clone()
    m, n = p.shape
    buf, v = torch.zeros_like(p), None
    for g in grads:
        g = g.double()
        buf = buf + (1 - momentum) * (g - buf)
        x = g + momentum * (buf - g)
        if muon_eq:
            fro = x.norm()
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6) * (fro / math.sqrt(m))
        x = x / (norm_factor * x.norm() + 1e-6)
        for a, b, c in POLAR_EXPRESS_COEFFS:
            if m <= n:
                A = x @ x.T
                x = a * x + (b * A + c * A @ A) @ x
            else:
                A = x.T @ x
                x = a * x + x @ (b * A + c * A @ A)
        if muon_plus:
            x = x * math.sqrt(min(m, n)) / x.norm()
        mean_sq = x.square().mean(dim=1 if m >= n else 0, keepdim=True)
        v = (1 - beta2) * mean_sq if v is None else v + (1 - beta2) * (mean_sq - v)
        scaled = x / v.sqrt()
        x = scaled * x.norm() / scaled.norm()
        eff_lr = lr * math.sqrt(max(1, m / n))
        p = p - eff_lr * x - eff_lr * wd * p * (x * p >= 0)
    return p


@pytest.mark.parametrize("variant", [{}, dict(norm_factor=1.02, muon_eq=False, muon_plus=False)],
                         ids=["default", "jan29"])
def test_muon_matches_float64_reference(variant):
    # stacks of (2, 16, 32) and (1, 48, 16): rank 0's chunks in the distributed test below
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 32, generator=g) / 4) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.randn(48, 16, generator=g) / 4))
    init = [p.detach().clone() for p in params]
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.2, beta2=0.9)
    group = dict(kind="muon", ns_steps=5, **hp)
    options = {} if not variant else dict(polar_express_norm=variant["norm_factor"], muon_eq=variant["muon_eq"],
                                          muon_plus=variant["muon_plus"])
    opt = MuonAdamW([dict(group, params=params[:2]), dict(group, params=params[2:])], **options)
    grads = {id(p): [torch.randn(p.shape, generator=g) for _ in range(4)] for p in params}
    for step in range(4):
        for p in params:
            p.grad = grads[id(p)][step]
        opt.step()
    for p, p0 in zip(params, init):
        expected = reference_muon(p0, grads[id(p)], hp["lr"], hp["momentum"], hp["weight_decay"], hp["beta2"], 4,
                                  **variant)
        torch.testing.assert_close(p.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
def test_jan29_muon_single_step_plain_reference(shape):
    # Jan-29's Muon (no MuonEq, no Muon+, Polar Express normalized by 1.02), one step from a zero
    # momentum buffer, written out plainly in float64: Nesterov momentum, Polar Express, NorMuon's
    # first step, the sqrt(max(1, m/n)) lr and cautious weight decay
    m, n = shape
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / 3
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    lr, mu, wd, beta2 = 0.03, 0.85, 0.05, 0.95
    buf = (1 - mu) * grad  # lerp(0, g, 1 - mu)
    x = (1 - mu) * grad + mu * buf  # lerp(g, buf, mu): Nesterov
    x = x / (1.02 * torch.sqrt((x * x).sum()) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if m <= n:
            A = x @ x.T
            x = a * x + b * (A @ x) + c * (A @ A @ x)
        else:
            A = x.T @ x
            x = a * x + b * (x @ A) + c * (x @ A @ A)
    v = (1 - beta2) * (x * x).mean(dim=1 if m >= n else 0, keepdim=True)  # lerp(0, mean x^2, 1 - beta2)
    scaled = x / torch.sqrt(v)
    x = scaled * torch.sqrt((x * x).sum() / (scaled * scaled).sum())
    eff_lr = lr * math.sqrt(max(1, m / n))
    expected = p0 - eff_lr * x - eff_lr * wd * p0 * (x * p0 >= 0)

    results = {}
    for name, options in [("jan29", dict(polar_express_norm=1.02, muon_eq=False, muon_plus=False)), ("default", {})]:
        p = torch.nn.Parameter(p0.float().clone())
        p.grad = grad.float()
        opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=mu, ns_steps=5, beta2=beta2,
                              weight_decay=wd)], **options)
        opt.step()
        results[name] = p.detach().double()
    torch.testing.assert_close(results["jan29"], expected, rtol=1e-5, atol=1e-6)
    # the switches matter: today's variant takes another step
    assert (results["default"] - expected).abs().max() > 1e-4


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_cautious_weight_decay_mask():
    # Rows of a Hadamard matrix are orthogonal with equal norms, so every Muon stage
    # (MuonEq, Polar Express, Muon+, NorMuon) leaves the direction alone: the applied
    # update is exactly G/sqrt(32), entries ±0.1768 with the signs of G.
    G = hadamard(32)[:16]
    p0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(p0.clone())
    p.grad = G.clone()
    lr, wd = 0.1, 0.5
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=wd)])
    opt.step()
    x = G / math.sqrt(32)
    agree = torch.sign(x) == torch.sign(p0)
    assert 0.3 < agree.float().mean() < 0.7  # both cases present
    expected = torch.where(agree, p0 - lr * x - lr * wd * p0, p0 - lr * x)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_update_norms_and_tall_lr_factor():
    # First step, no weight decay: the update is eff_lr * X with |X|_F = sqrt(min(m, n))
    # (Muon+, kept by NorMuon), eff_lr = lr * sqrt(max(1, m/n)), and NorMuon's first step
    # gives every row (m >= n) or column (m < n) of X the same norm.
    g = torch.Generator().manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(48, 16, generator=g))
    wide = torch.nn.Parameter(torch.randn(16, 32, generator=g))
    init = [tall.detach().clone(), wide.detach().clone()]
    lr = 0.01
    group = dict(kind="muon", lr=lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    opt = MuonAdamW([dict(group, params=[tall]), dict(group, params=[wide])])
    for p in (tall, wide):
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    d_tall, d_wide = init[0] - tall.detach(), init[1] - wide.detach()
    assert d_tall.norm().item() == pytest.approx(lr * math.sqrt(3) * 4, rel=1e-5)
    assert d_wide.norm().item() == pytest.approx(lr * 4, rel=1e-5)
    torch.testing.assert_close(d_tall.norm(dim=1), torch.full((48,), d_tall.norm().item() / math.sqrt(48)))
    torch.testing.assert_close(d_wide.norm(dim=0), torch.full((32,), d_wide.norm().item() / math.sqrt(32)))
    assert opt.state[tall]["second_momentum_buffer"].shape == (1, 48, 1)
    assert opt.state[wide]["second_momentum_buffer"].shape == (1, 1, 32)


# ---------------------------------------------------------------------------
# Whole optimizer


def test_convergence_smoke():
    params = toy_params()
    losses = train(params, toy_optimizer(params), toy_batch(), 60)
    assert losses[-1] < 0.01 * losses[0]  # measured: 1.15 -> 0.001


def test_hyperparameter_changes_do_not_recompile():
    params = toy_params()
    opt = toy_optimizer(params)
    batch = toy_batch()
    train(params, opt, batch, 1)  # compiles (or reuses) one graph per kernel and shape
    graphs = counters["stats"]["unique_graphs"]
    for step in range(4):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / 4)
            group["weight_decay"] = 0.05 * step
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.02 * step
                group["beta2"] = 0.9 + 0.02 * step
            else:
                group["betas"] = (0.8 + 0.01 * step, 0.95)
                group["eps"] = 10.0 ** -(8 + step)
        train(params, opt, batch, 1)
    assert counters["stats"]["unique_graphs"] == graphs
    # the values really reach the kernels: lr = 0 leaves every parameter untouched
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    train(params, opt, batch, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert counters["stats"]["unique_graphs"] == graphs
    # nor does another recipe's Muon variant (jan29's: Polar Express factor 1.02, no MuonEq, no Muon+)
    other = toy_optimizer(params, polar_express_norm=1.02, muon_eq=False, muon_plus=False)
    train(params, other, batch, 2)
    assert counters["stats"]["unique_graphs"] == graphs


def test_bitwise_determinism():
    runs = []
    for _ in range(2):
        params = toy_params()
        train(params, toy_optimizer(params), toy_batch(), 5)
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def save_checkpoint(params, opt):
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    return buf


def resume(buf):
    ckpt = torch.load(buf)
    params = [torch.nn.Parameter(t) for t in ckpt["params"]]
    opt = toy_optimizer(params, muon_lr=123.0)  # hyperparameters come back from the state dict
    opt.load_state_dict(ckpt["optim"])
    return params, opt


def test_state_dict_round_trip_is_bitwise():
    params = toy_params()
    opt = toy_optimizer(params)
    batch = toy_batch()
    train(params, opt, batch, 3)
    buf = save_checkpoint(params, opt)
    train(params, opt, batch, 3)
    params2, opt2 = resume(buf)
    assert opt2.param_groups[1]["lr"] == 0.02
    train(params2, opt2, batch, 3)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


# ---------------------------------------------------------------------------
# Distributed: 2 gloo ranks, each on half the batch, against 1 process on all of it


def dist_worker(rank, world, port, out_dir, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        idx, target = toy_batch()
        half = len(idx) // world
        batch = (idx[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half])
        params = toy_params()
        opt = toy_optimizer(params)
        train(params, opt, batch, steps - 2)
        buf = save_checkpoint(params, opt)
        train(params, opt, batch, 2)
        # resume from this rank's own shard of the optimizer state
        params2, opt2 = resume(buf)
        train(params2, opt2, batch, 2)
        resumed_exactly = all(torch.equal(a, b) for a, b in zip(params, params2))
        emb, bias, wa, wb, wc, tall = params
        state_shapes = {
            "emb": tuple(opt.state[emb]["exp_avg"].shape),
            "bias": tuple(opt.state[bias]["exp_avg"].shape),
            "wide": tuple(opt.state[wa]["momentum_buffer"].shape),
            "tall": tuple(opt.state[tall]["momentum_buffer"].shape) if opt.state[tall] else None,
        }
        # a large AdamW tensor whose first dimension does not split over the ranks
        odd = torch.nn.Parameter(torch.zeros(3, 400))
        odd.grad = torch.ones(3, 400)
        odd_opt = MuonAdamW([dict(kind="adamw", params=[odd], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)])
        try:
            odd_opt.step()
            odd_error = None
        except PicochatError as e:
            odd_error = str(e)
        torch.save({"params": [p.detach() for p in params], "state_shapes": state_shapes,
                    "resumed_exactly": resumed_exactly, "odd_error": odd_error}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    steps = 6
    # fork rather than spawn: the workers inherit the imports and the kernels this process
    # already compiled; spawn re-imports torch and re-traces every kernel (20-40 s here)
    mp.start_processes(dist_worker, args=(2, free_port(), str(tmp_path), steps), nprocs=2, start_method="fork")
    params = toy_params()
    train(params, toy_optimizer(params), toy_batch(), steps)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # every rank ends with identical parameters, equal to the full-batch run
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    for got, want in zip(r0["params"], params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=2e-6)  # measured max diff 4e-7
    # state is sharded: emb rows split in two, the small bias replicated, the Muon stack
    # of 3 split 2 + 1, and the single tall matrix owned by rank 0 alone
    assert r0["state_shapes"] == {"emb": (32, 32), "bias": (8,), "wide": (2, 16, 32), "tall": (1, 48, 16)}
    assert r1["state_shapes"] == {"emb": (32, 32), "bias": (8,), "wide": (1, 16, 32), "tall": None}
    assert r0["resumed_exactly"] and r1["resumed_exactly"]
    assert all("divisible by the world size" in (r["odd_error"] or "") for r in (r0, r1))
