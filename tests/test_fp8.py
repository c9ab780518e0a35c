"""picochat/fp8.py: the tensorwise scales by hand, the CPU product against torch._scaled_mm, the
operand layouts a GPU's fp8 GEMM demands, Float8Linear against the dequantized computation
done slowly, and the conversion of a GPT (which layers, shared weights, the FLOPs count, fp8
off for evaluation, torch.compile). base-train --fp8 is tests/test_base_train.py's."""

import pytest
import torch
import torch.nn.functional as F

from picochat import fp8
from picochat.common import PicochatError
from picochat.fp8 import E4M3, E5M2, Float8Linear, column_major, convert, disabled, to_fp8
from picochat.gpt import GPTConfig, Linear, build_model


def test_scales_put_the_amax_on_the_format_max():
    x = torch.tensor([[-2.0, 1.0], [0.5, 0.25]])
    x8, inv = to_fp8(x, E4M3)
    assert x8.dtype == E4M3 and inv.dtype == torch.float32 and inv.dim() == 0
    assert inv.item() == pytest.approx(2 / 448, rel=1e-7)  # scale 448 / amax 2
    assert x8.float().tolist() == [[-448.0, 224.0], [112.0, 56.0]]  # exact in e4m3: powers of 2 times 7
    g8, g_inv = to_fp8(x, E5M2)
    assert g8.float()[0, 0].item() == -57344.0 and g_inv.item() == pytest.approx(2 / 57344, rel=1e-7)
    # rounding: e4m3 keeps 3 mantissa bits, so every value comes back within 1/16 of itself
    y = torch.randn(1000)
    y8, y_inv = to_fp8(y, E4M3)
    assert ((y8.float() * y_inv - y).abs() <= y.abs() / 16 + 1e-6).all()
    # an all-zero tensor (a gradient that is 0) quantizes to zeros, without inf or nan
    z8, z_inv = to_fp8(torch.zeros(4, 4), E5M2)
    assert (z8.float() == 0).all() and torch.isfinite(z_inv)


@pytest.mark.parametrize("a_dtype, out_dtype", [(E4M3, torch.float32), (E5M2, torch.float32), (E4M3, torch.bfloat16)])
def test_the_cpu_product_is_torch_scaled_mm(a_dtype, out_dtype):
    """torch's own CPU _scaled_mm (slow, so only here) gives what fp8.scaled_mm computes on the CPU."""
    torch.manual_seed(0)
    a8, sa = to_fp8(torch.randn(32, 64) * 3, a_dtype)
    b8, sb = to_fp8(torch.randn(48, 64) / 7, E4M3)
    ours = fp8.scaled_mm(a8, b8.t(), sa, sb, out_dtype, use_fast_accum=False)
    theirs = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    assert ours.dtype == theirs.dtype == out_dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(ours, theirs, **tolerance)


def layer(seed=0, in_features=128, out_features=256):
    torch.manual_seed(seed)
    linear = Linear(in_features, out_features)
    torch.nn.init.normal_(linear.weight, std=in_features**-0.5)
    return linear


def test_every_gemm_gets_operands_a_gpu_accepts(monkeypatch):
    """cuBLASLt's fp8 GEMM: the first operand row-major, the second column-major, every side a
    multiple of 16, no e5m2 x e5m2, 0-d fp32 scales. The CPU would accept anything, so check it."""
    calls, real = [], fp8.scaled_mm

    def checked(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
        assert a.stride(1) == 1 and a.stride(0) == a.size(1), "first operand must be row-major"
        assert b.stride(0) == 1 and b.stride(1) == b.size(0), "second operand must be column-major"
        assert all(n % 16 == 0 for n in (*a.shape, *b.shape))
        assert b.dtype == E4M3 and a.dtype in (E4M3, E5M2)
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.dim() == scale_b.dim() == 0
        calls.append((tuple(a.shape), tuple(b.shape), a.dtype, out_dtype, use_fast_accum))
        return real(a, b, scale_a, scale_b, out_dtype, use_fast_accum)

    monkeypatch.setattr(fp8, "scaled_mm", checked)
    f = Float8Linear.from_linear(layer())
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    f(x).sum().backward()
    assert calls == [((32, 128), (128, 256), E4M3, torch.bfloat16, True),  # forward: fast accumulation
                     ((32, 256), (256, 128), E5M2, torch.bfloat16, False),  # input gradient
                     ((256, 32), (32, 128), E5M2, torch.float32, False)]  # weight gradient, in the weight's dtype
    # a strided input (a transposed view) and a strided output gradient still give row-major operands
    x = torch.randn(128, 32, dtype=torch.bfloat16).t().requires_grad_()
    y = f(x)
    y.backward(torch.randn(256, 32, dtype=torch.bfloat16).t())
    assert len(calls) == 6 and x.grad.shape == x.shape


def test_compiled_with_the_real_scaled_mm(monkeypatch):
    """Under torch.compile with torch._scaled_mm itself (as on a GPU): inductor's lowering of the op
    accepts the operands (it checks their layout on the CPU too), and forward and gradients equal
    the eager ones."""
    monkeypatch.setattr(fp8, "scaled_mm", lambda a, b, sa, sb, out_dtype, use_fast_accum: torch._scaled_mm(
        a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=use_fast_accum))
    f = Float8Linear.from_linear(layer(in_features=32, out_features=48))
    torch._dynamo.reset()  # a graph compiled earlier with the emulation would be reused
    compiled = torch.compile(f, dynamic=False, fullgraph=True)
    x = torch.randn(16, 32, requires_grad=True)
    g = torch.randn(16, 48)
    results = []
    for fn in (f, compiled):
        x.grad = f.weight.grad = None
        y = fn(x)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), f.weight.grad.clone()))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


def test_float8_linear_is_the_dequantized_matmul():
    """Forward and both gradients equal the same products computed slowly from the dequantized
    operands (float64), and stay within the quantization error of the full-precision ones."""
    linear = layer()
    f = Float8Linear.from_linear(linear)
    assert f.weight is linear.weight
    torch.manual_seed(1)
    x = torch.randn(4, 8, 128, requires_grad=True)
    g = torch.randn(4, 8, 256)
    y = f(x)
    y.backward(g)
    assert y.shape == (4, 8, 256) and y.dtype == torch.float32

    def deq(t, dtype):
        t8, inv = to_fp8(t.detach().reshape(-1, t.size(-1)), dtype)
        return t8.double() * inv.double()

    xq, wq, gq = deq(x, E4M3), deq(linear.weight, E4M3), deq(g, E5M2)
    torch.testing.assert_close(y.reshape(-1, 256).double(), xq @ wq.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 128).double(), gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad.double(), gq.T @ xq, rtol=1e-5, atol=1e-5)

    exact_x = x.detach().clone().requires_grad_()
    exact_w = linear.weight.detach().clone().requires_grad_()
    exact = F.linear(exact_x, exact_w)
    exact.backward(g)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # measured: 0.038 forward (two e4m3 operands), 0.059 for the gradients (e5m2 has 2 mantissa bits)
    assert rel(y.detach(), exact.detach()) < 0.05
    assert rel(x.grad, exact_x.grad) < 0.08 and rel(linear.weight.grad, exact_w.grad) < 0.08


def small_gpt():
    config = GPTConfig(sequence_len=32, vocab_size=500, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                       window_pattern="L")
    torch.manual_seed(0)
    return build_model(config, "cpu", torch.float32)


def test_converting_a_gpt():
    model = small_gpt()
    params = list(model.parameters())
    keys = list(model.state_dict())
    flops, matmul = model.estimate_flops(), model.num_matmul_params()
    idx = torch.randint(0, 500, (2, 32))
    plain = model(idx)

    converted = convert(model)
    blocks = [f"transformer.h.{i}.{m}" for i in range(2) for m in
              ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(converted) == sorted(blocks + ["lm_head"])  # not the ve_gate (32 -> 2) nor smear_gate (24 -> 1)
    assert type(model.transformer.h[1].attn.ve_gate) is Linear and type(model.smear_gate) is Linear
    # the same Parameters (the optimizer and checkpoints see nothing new), and the FLOPs count keeps them
    assert all(a is b for a, b in zip(params, model.parameters())) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys
    assert (model.estimate_flops(), model.num_matmul_params()) == (flops, matmul)

    low = model(idx)
    assert not torch.equal(low, plain) and ((low - plain).norm() / plain.norm()).item() < 0.1
    with disabled(model):
        assert torch.equal(model(idx), plain)  # evaluations see the compute dtype's model exactly
    assert torch.equal(model(idx), low)  # and fp8 is back afterwards

    compiled = torch.compile(model, dynamic=False)
    torch.testing.assert_close(compiled(idx), low, rtol=1e-5, atol=1e-5)
    with disabled(model):
        torch.testing.assert_close(compiled(idx), plain, rtol=1e-5, atol=1e-5)  # recompiled, not the fp8 graph
    loss = compiled(idx, idx)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_where_fp8_cannot_run():
    with pytest.raises(PicochatError, match="CUDA GPUs .* not on mps"):
        fp8.check_supported(torch.device("mps"))
    fp8.check_supported(torch.device("cpu"))
    # the layouts: a column-major copy holds the same matrix
    m = torch.arange(6.0).view(2, 3)
    assert torch.equal(column_major(m), m) and column_major(m).stride() == (1, 2)
