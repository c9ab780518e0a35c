"""Attention backends against a plain softmax reference written out here."""

import warnings

import pytest
import torch

from picochat import attention as A
from picochat.common import PicochatError

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def auto_backend(monkeypatch):
    """Every test starts with automatic backend choice and no env override."""
    monkeypatch.delenv("PICOCHAT_ATTENTION", raising=False)
    A.force_backend(None)
    yield
    A.force_backend(None)


def reference_attention(q, k, v, window):
    """Textbook causal softmax attention in float64, one query head at a time.
    Query head h reads kv head h // (H // Hkv). Window w: query r sees keys r-w..r."""
    B, T, H, D = q.shape
    group = H // k.size(2)
    q, k, v = q.double(), k.double(), v.double()
    r = torch.arange(T)[:, None]
    c = torch.arange(T)[None, :]
    visible = c <= r
    if 0 <= window < T:
        visible = visible & (r - c <= window)
    out = []
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / D**0.5  # (B, T, T)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out.append(probs @ v[:, :, h // group])
    return torch.stack(out, dim=2)


def make_qkv(B, T, H, Hkv, D, dtype, seed=0, grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad) for s in shapes]


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

# (T, H, Hkv, window): full context, window >= T, window 0 (only itself), windows smaller than the
# 128-token flex block, not multiples of 128, exactly one block, T not a multiple of the block, GQA
CASES = [
    (64, 2, 2, -1),
    (64, 2, 2, 64),
    (64, 4, 2, 0),
    (200, 4, 4, 1),
    (200, 4, 1, 37),
    (300, 4, 2, 100),
    (300, 2, 2, 128),
    (300, 4, 2, 130),
    (300, 6, 3, 298),
]


@pytest.mark.parametrize("T,H,Hkv,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_forward_backward(T, H, Hkv, window, dtype):
    q, k, v = make_qkv(2, T, H, Hkv, 16, dtype, grad=True)
    y = A.sdpa_attention(q, k, v, window)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, window)
    assert y.shape == (2, T, H, 16) and y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out.to(dtype))
    ref.backward(grad_out.double())
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[dtype])


def flex_uncompiled(q, k, v, window):
    with warnings.catch_warnings():  # torch warns that uncompiled flex materializes the scores
        warnings.simplefilter("ignore", UserWarning)
        return A.flex_window_attention(q, k, v, window, compiled=False)


@pytest.mark.parametrize("T,H,Hkv,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_uncompiled_forward(T, H, Hkv, window, dtype):
    q, k, v = make_qkv(2, T, H, Hkv, 16, dtype)
    with torch.no_grad():
        y = flex_uncompiled(q, k, v, window)
    assert y.shape == (2, T, H, 16) and y.dtype == dtype
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, window), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_compiled_forward(dtype):
    """One shape (so one compile per dtype), many windows: the window lives in a tensor,
    so changing it must neither recompile nor be ignored."""
    q, k, v = make_qkv(2, 300, 4, 2, 16, dtype)
    with torch.no_grad():
        for window in (-1, 0, 5, 37, 127, 128, 130, 299):
            y = A.flex_window_attention(q, k, v, window)
            torch.testing.assert_close(y.double(), reference_attention(q, k, v, window), **TOL[dtype])


def test_flex_has_no_cpu_backward():
    """Why automatic choice never picks flex on CPU: torch refuses its backward there."""
    q, k, v = make_qkv(1, 64, 2, 2, 16, torch.float32, grad=True)
    with pytest.raises(NotImplementedError):
        flex_uncompiled(q, k, v, 8)


@pytest.mark.skipif(not HAS_CUDA, reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("T,H,Hkv,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backward_cuda(T, H, Hkv, window, dtype):
    q, k, v = make_qkv(2, T, H, Hkv, 16, dtype, grad=True, device="cuda")
    y = A.flex_window_attention(q, k, v, window)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, window)
    torch.testing.assert_close(y.double().cpu(), ref, **TOL[dtype])
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out.to(device="cuda", dtype=dtype))
    ref.backward(grad_out.double())
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, **TOL[dtype])


@pytest.mark.skipif(A.load_fa3() is None, reason="FA3 is not available (needs CUDA and the kernels package)")
@pytest.mark.parametrize("T,H,Hkv,window", CASES)
def test_fa3_forward_backward(T, H, Hkv, window):
    q, k, v = make_qkv(2, T, H, Hkv, 64, torch.bfloat16, grad=True, device="cuda")
    y = A.fa3_attention(q, k, v, window)
    ref = reference_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), window)
    torch.testing.assert_close(y.double().cpu(), ref, **TOL[torch.bfloat16])
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------
# Choosing and forcing backends


def test_automatic_choice_on_cpu_is_sdpa():
    for window in (-1, 100, 2048):
        assert A.backend_name(window, 2048, "cpu", torch.float32) == "sdpa"
        assert A.backend_name(window, 2048, "cpu", torch.bfloat16) == "sdpa"


@pytest.mark.skipif(A.load_fa3() is not None, reason="FA3 is loaded, so it wins everywhere")
def test_automatic_choice_on_cuda_without_fa3():
    assert A.backend_name(512, 2048, "cuda", torch.bfloat16) == "flex"
    assert A.backend_name(2048, 2048, "cuda", torch.bfloat16) == "sdpa"
    assert A.backend_name(-1, 2048, "cuda", torch.float32) == "sdpa"
    assert A.backend_name(512, 2048, "cuda", torch.float32) == "flex"
    assert A.backend_name(512, 300, "cuda", torch.bfloat16) == "sdpa"  # the window does not bite at T=300


def test_describe_names_the_slow_path():
    text = A.describe([512, 512, 512, 2048], 2048, "cpu", torch.float32)
    lines = text.splitlines()
    assert len(lines) == 2
    assert "window 512 (layers 0,1,2)" in lines[0] and "SLOW" in lines[0]
    assert "full context (layers 3)" in lines[1] and "sdpa (causal)" in lines[1]


def test_force_backend_by_function_and_env(monkeypatch):
    A.force_backend("flex")
    assert A.backend_name(-1, 64, "cpu", torch.float32) == "flex"
    A.force_backend(None)
    monkeypatch.setenv("PICOCHAT_ATTENTION", "flex")
    assert A.backend_name(-1, 64, "cpu", torch.float32) == "flex"
    q, k, v = make_qkv(2, 300, 4, 2, 16, torch.float32)  # the compiled flex test's shape: no new compile
    with torch.no_grad():
        torch.testing.assert_close(A.attention(q, k, v, 20).double(), reference_attention(q, k, v, 20),
                                   **TOL[torch.float32])
    monkeypatch.setenv("PICOCHAT_ATTENTION", "sdpa")
    assert A.backend_name(512, 2048, "cuda", torch.bfloat16) == "sdpa"


def test_bad_backend_names_are_user_errors(monkeypatch):
    with pytest.raises(PicochatError):
        A.force_backend("flash2")
    monkeypatch.setenv("PICOCHAT_ATTENTION", "xformers")
    with pytest.raises(PicochatError, match="PICOCHAT_ATTENTION"):
        A.backend_name(-1, 64, "cpu", torch.float32)


@pytest.mark.skipif(A.load_fa3() is not None, reason="FA3 is available here")
def test_forcing_missing_fa3_fails_loudly():
    A.force_backend("fa3")
    q, k, v = make_qkv(1, 16, 2, 2, 16, torch.float32)
    with pytest.raises(PicochatError, match="fa3"):
        A.attention(q, k, v, -1)


def test_attention_dispatch_matches_reference():
    q, k, v = make_qkv(2, 200, 4, 2, 16, torch.float32)
    for window in (-1, 50):
        torch.testing.assert_close(A.attention(q, k, v, window).double(), reference_attention(q, k, v, window),
                                   **TOL[torch.float32])


def test_packing_equals_separate_sequences():
    """Two rows; the first packs a 40-token prefix with continuations of 30, 25 and 1 tokens, the
    second a single 70-token sequence and 20 padding tokens. Every packed token's output must be
    that of the same token in its own unpacked sequence, windows (counted in positions) and GQA
    included."""
    prefix, rests = 40, [30, 25, 1]
    q, k, v = make_qkv(2, prefix + sum(rests), 4, 2, 16, torch.float32)
    positions = torch.zeros(2, q.size(1), dtype=torch.long)
    segments = torch.full((2, q.size(1)), -1, dtype=torch.long)
    prev = torch.zeros(2, q.size(1), dtype=torch.long)  # attention does not read it
    where = [list(range(prefix))]  # row 0: packed indices of each sequence's tokens
    positions[0, :prefix], segments[0, :prefix] = torch.arange(prefix), 0
    start = prefix
    for s, n in enumerate(rests, start=1):
        positions[0, start:start + n] = torch.arange(prefix, prefix + n)
        segments[0, start:start + n] = s
        where.append(list(range(prefix)) + list(range(start, start + n)))
        start += n
    positions[1, :70], segments[1, :70] = torch.arange(70), 0
    packing = A.Packing(positions, segments, prev)
    for window in (-1, 10, 45):
        y = A.attention(q, k, v, window, packing)
        assert y.isfinite().all()  # padding sees itself: no empty softmax anywhere
        for w in where[1:]:
            sub = [x[:1, w] for x in (q, k, v)]
            torch.testing.assert_close(y[:1, w].double(), reference_attention(*sub, window), **TOL[torch.float32])
        sub = [x[1:, :70] for x in (q, k, v)]
        torch.testing.assert_close(y[1:, :70].double(), reference_attention(*sub, window), **TOL[torch.float32])


def test_mask_cache_keeps_only_the_most_recent(monkeypatch):
    monkeypatch.setattr(A, "_masks", A.OrderedDict())
    first = A.cached_mask("dense", 10, 2, "cpu")
    for T in range(11, 11 + A.MAX_CACHED_MASKS - 1):
        A.cached_mask("dense", T, 2, "cpu")
    assert A.cached_mask("dense", 10, 2, "cpu") is first  # still cached, and now the most recent
    A.cached_mask("dense", 100, 2, "cpu")  # evicts T=11, the least recently used
    assert len(A._masks) == A.MAX_CACHED_MASKS and ("dense", 11, 2, torch.device("cpu")) not in A._masks
    assert A.cached_mask("dense", 10, 2, "cpu") is first
