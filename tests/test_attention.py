"""Attention backends against a plain softmax reference written out here."""

import re
import sys
import types
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


@pytest.mark.skipif(A.load_fa3() is None, reason=f"FA3 not loaded: {A.fa3_status()}")
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


def test_pinned_masks_survive_the_cache(monkeypatch):
    monkeypatch.setattr(A, "_masks", A.OrderedDict())
    monkeypatch.setattr(A, "_pinned", {})
    A.pin_masks([50, 300, 50], 300, "cpu", torch.float32)  # one short window, one full
    assert list(A._pinned) == [("dense", 300, 50, torch.device("cpu"))]
    pinned = A._pinned[("dense", 300, 50, torch.device("cpu"))]
    for T in range(10, 10 + 2 * A.MAX_CACHED_MASKS):
        A.cached_mask("dense", T, 5, "cpu")
    assert A.cached_mask("dense", 300, 50, "cpu") is pinned
    A.pin_masks([50], 300, "cpu", torch.float32)  # pinning again keeps the same mask
    assert A._pinned[("dense", 300, 50, torch.device("cpu"))] is pinned
    A.force_backend("flex")
    A.pin_masks([50], 300, "cpu", torch.float32)
    assert ("block", 300, 50, torch.device("cpu")) in A._pinned


# ---------------------------------------------------------------------------
# Loading FA3, against a fake `kernels` package (no GPU or hub needed)


def fake_kernels(calls, published=True, error=None, returns_lse=False, old_api=False):
    """A stand-in for the kernels package. Like kernels >= 0.15 it refuses a load without
    revision= or version=, and like >= 0.14 a repo outside the trusted publishers without
    trust_remote_code=True. With old_api, the signatures of kernels 0.12 (no trust_remote_code)."""

    def flash_attn_func(q, k, v, causal, window_size):
        calls.append(("flash_attn_func", causal, window_size))
        y = q.clone()
        return (y, torch.zeros(q.shape[:3])) if returns_lse else y

    def check(repo_id, revision, version, trust_remote_code):
        if revision is None and version is None:
            raise ValueError("A kernel version or revision must be specified.")
        if not old_api and repo_id.split("/")[0] != "kernels-community" and trust_remote_code is not True:
            raise ValueError(f"{repo_id} is not from a trusted publisher")

    def has_kernel(repo_id, *, revision=None, version=None, backend=None, trust_remote_code=False,
                   check_arch=True):
        calls.append(("has_kernel", repo_id, dict(revision=revision, trust_remote_code=trust_remote_code)))
        check(repo_id, revision, version, trust_remote_code)
        return published

    def get_kernel(repo_id, *, revision=None, version=None, backend=None, user_agent=None,
                   trust_remote_code=False, check_arch=True):
        calls.append(("get_kernel", repo_id, dict(revision=revision, trust_remote_code=trust_remote_code)))
        check(repo_id, revision, version, trust_remote_code)
        if error is not None:
            raise error
        return types.SimpleNamespace(flash_attn_interface=types.SimpleNamespace(flash_attn_func=flash_attn_func))

    def old_has_kernel(repo_id, revision=None, version=None):
        return has_kernel(repo_id, revision=revision, version=version)

    def old_get_kernel(repo_id, revision=None, version=None, user_agent=None):
        return get_kernel(repo_id, revision=revision, version=version)

    module = types.ModuleType("kernels")
    module.__version__ = "0.12.3" if old_api else "0.17.2"
    module.has_kernel = old_has_kernel if old_api else has_kernel
    module.get_kernel = old_get_kernel if old_api else get_kernel
    return module


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, **fake_kernels options) -> calls: a CUDA device of that compute
    capability and a fake kernels package, with FA3 not yet loaded in this process."""
    monkeypatch.setattr(A, "_fa3", None)
    monkeypatch.setattr(A, "_fa3_status", None)

    def setup(capability, **options):
        calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setitem(sys.modules, "kernels", fake_kernels(calls, **options))
        return calls

    return setup


def trusted(repo, trust=True):
    """The arguments of a pinned load: a full commit hash, never a branch a push can move."""
    revision = A.FA3_REVISIONS[repo]
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    return dict(revision=revision, trust_remote_code=trust)


def test_fa3_on_hopper_loads_the_hopper_build(fake_gpu):
    calls = fake_gpu((9, 0))
    assert A.load_fa3() is not None
    hopper = "varunneal/flash-attention-3"
    assert calls == [("get_kernel", hopper, trusted(hopper))]
    assert A.fa3_status() == f"FA3 from {hopper}@{A.FA3_REVISIONS[hopper][:7]} (kernels 0.17.2)"
    assert A.backend_name(512, 2048, "cuda", torch.bfloat16) == "fa3"
    assert A.backend_name(512, 2048, "cuda", torch.float32) == "flex"  # FA3 is bf16 only
    A.load_fa3()
    assert len(calls) == 1  # tried once per process


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9)])
def test_fa3_on_ampere_and_ada_loads_the_community_build(fake_gpu, capability):
    calls = fake_gpu(capability)
    assert A.load_fa3() is not None
    repo = "kernels-community/flash-attn3"
    assert calls == [("has_kernel", repo, trusted(repo)), ("get_kernel", repo, trusted(repo))]
    assert A.fa3_status() == f"FA3 from {repo}@{A.FA3_REVISIONS[repo][:7]} (kernels 0.17.2)"


@pytest.mark.parametrize("capability", [(10, 0), (12, 0), (7, 5)])
def test_fa3_is_not_tried_on_other_architectures(fake_gpu, capability):
    """Blackwell must not get an Ampere/Ada build that loads and then crashes at the first forward."""
    calls = fake_gpu(capability)
    assert A.load_fa3() is None
    assert calls == []
    assert A.fa3_status() == f"no FA3 kernel published for SM{capability[0]}{capability[1]}"
    assert A.backend_name(512, 2048, "cuda", torch.bfloat16) == "flex"


def test_fa3_with_no_build_for_this_torch(fake_gpu):
    calls = fake_gpu((8, 6), published=False)
    assert A.load_fa3() is None
    assert [c[0] for c in calls] == ["has_kernel"]
    assert A.fa3_status() == "kernels-community/flash-attn3 has no build for this torch and SM86"


def test_fa3_load_error_becomes_a_status(fake_gpu):
    fake_gpu((9, 0), error=RuntimeError("no build for torch213-cxx11-cu130"))
    assert A.load_fa3() is None
    status = A.fa3_status()
    assert "varunneal/flash-attention-3" in status and "kernels 0.17.2" in status
    assert "RuntimeError: no build for torch213-cxx11-cu130" in status
    A.force_backend("fa3")
    q, k, v = make_qkv(1, 16, 2, 2, 16, torch.bfloat16)
    with pytest.raises(PicochatError, match="RuntimeError: no build"):
        A.attention(q, k, v, -1)


def test_fa3_with_kernels_before_trust_remote_code(fake_gpu):
    """kernels 0.12 has no trust_remote_code: passing it would be a TypeError."""
    calls = fake_gpu((8, 0), old_api=True)
    assert A.load_fa3() is not None, A.fa3_status()
    assert [c[2] for c in calls] == [trusted("kernels-community/flash-attn3", trust=False)] * 2


def test_fa3_without_the_kernels_package(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    assert A.load_fa3() is None
    assert A.fa3_status().startswith("FA3 needs the kernels package, pip install 'picochat[gpu]'")


def test_fa3_without_cuda(fake_gpu, monkeypatch):
    calls = fake_gpu((9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert A.load_fa3() is None and calls == []
    assert A.fa3_status() == "no CUDA"


@pytest.mark.parametrize("returns_lse", [False, True])
def test_fa3_attention_windows_and_output(fake_gpu, returns_lse):
    """FA3's window_size=(left, right): (-1, 0) is all of the causal prefix, (w, 0) the last w
    keys and the query itself. Builds that also return the log-sum-exp get unwrapped."""
    calls = fake_gpu((9, 0), returns_lse=returns_lse)
    q, k, v = make_qkv(1, 64, 2, 2, 16, torch.bfloat16)
    for window, expected in [(-1, (-1, 0)), (63, (-1, 0)), (1000, (-1, 0)), (10, (10, 0)), (0, (0, 0))]:
        y = A.fa3_attention(q, k, v, window)
        assert isinstance(y, torch.Tensor) and torch.equal(y, q)
        assert calls[-1] == ("flash_attn_func", True, expected)
