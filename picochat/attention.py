"""Causal self-attention with a per-layer sliding window, behind one function.

    attention(q, k, v, window) -> y        q: (B, T, H, D), k and v: (B, T, Hkv, D), y: (B, T, H, D)

A window of w means query r sees keys r-w .. r (w+1 keys); w < 0 or w >= T is plain causal
attention. H may be a multiple of Hkv (grouped-query attention). The softmax scale is 1/sqrt(D).

Three backends, chosen per call from the device, the dtype and whether the window bites:
- fa3:  Flash Attention 3 from the Hugging Face kernel hub (`kernels` package: pip install
        'picochat[gpu]'), on Hopper (SM90) and Ampere/Ada (SM8x) only. CUDA and bf16 only;
        handles windows natively. Used for everything when it loads; fa3_status() says why not.
- flex: torch FlexAttention, compiled, with a block-sparse mask cached per (T, window, device).
        Used for sliding windows on CUDA without FA3. FlexAttention has no backward on CPU/MPS,
        so there it only runs when forced (inference).
- sdpa: F.scaled_dot_product_attention. With is_causal it runs the fused flash kernels; a sliding
        window needs a dense T x T mask instead, which is slow. That slow path is never silent:
        describe() names it and the model prints the choice once when it is built.

Force one backend with PICOCHAT_ATTENTION=fa3|flex|sdpa or force_backend(name) (tests, benchmarks).
The (B, T, H, D) layout and the per-call window leave room for a KV cache (Tq != Tk) later.

A fourth case is not a backend choice: a Packing (several sequences that share a prefix, packed
into one row; CORE uses it to run a few-shot prompt once for all its answer options) always runs
SDPA with a dense mask built from the packing.
"""

import inspect
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from picochat.common import PicochatError

BACKENDS = ("fa3", "flex", "sdpa")

_forced = None  # set by force_backend(); PICOCHAT_ATTENTION is read on every call, so tests can set it late
_fa3 = None
_fa3_status = None  # why FA3 is or is not available; None until we tried to load it


def force_backend(name):
    """Use `name` for every call from now on (None = choose automatically again)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise PicochatError(f"unknown attention backend {name!r} (choose one of {', '.join(BACKENDS)})")
    _forced = name


def forced_backend():
    name = _forced or os.environ.get("PICOCHAT_ATTENTION") or None
    if name is not None and name not in BACKENDS:
        raise PicochatError(f"PICOCHAT_ATTENTION={name!r} is not one of {', '.join(BACKENDS)}")
    return name


# ---------------------------------------------------------------------------
# FA3 from the kernel hub: loaded once, only on CUDA, and any failure just means "no FA3".


# The hub commits we load FA3 from: a pinned commit keeps a run reproducible, and code pushed to
# the repo later cannot run in ours. To move to a newer build, change the hash here.
FA3_REVISIONS = {
    "varunneal/flash-attention-3": "de87b9b5af06dd9984df595bef90b2eba44b181a",  # Hopper
    "kernels-community/flash-attn3": "9542c462013476380ce4b395b9ddc0e8118161ee",  # Ampere/Ada
}


def _hub_kwargs(fn, repo: str) -> dict:
    """Arguments for kernels.get_kernel / has_kernel: the pinned revision, and that we trust it.
    kernels >= 0.14 refuses repos of publishers the hub does not list as trusted (the Hopper build
    is in a personal repo) unless trust_remote_code=True; older releases, and has_kernel before
    0.17, do not take that argument."""
    kwargs = {"revision": FA3_REVISIONS[repo]}
    if "trust_remote_code" in inspect.signature(fn).parameters:
        kwargs["trust_remote_code"] = True
    return kwargs


def load_fa3():
    """The flash_attn_interface module of FA3, or None. Tried once per process; fa3_status() says why."""
    global _fa3, _fa3_status
    if _fa3_status is not None:
        return _fa3
    if not torch.cuda.is_available():
        _fa3_status = "no CUDA"
        return None
    major, minor = torch.cuda.get_device_capability()
    # Only the architectures these builds are made for: a build for another one (Blackwell is
    # SM10x/12x) can load fine and then crash at the first forward.
    if major == 9:
        repo = "varunneal/flash-attention-3"  # Hopper
    elif major == 8:
        repo = "kernels-community/flash-attn3"  # Ampere/Ada, where published for this torch
    else:
        _fa3_status = f"no FA3 kernel published for SM{major}{minor}"
        return None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    try:
        import kernels
    except ImportError as e:
        _fa3_status = f"FA3 needs the kernels package, pip install 'picochat[gpu]' ({e})"
        return None
    version = getattr(kernels, "__version__", "?")
    try:  # offline, no build for this torch, refused by kernels: all mean SDPA/Flex instead
        if major == 8 and not kernels.has_kernel(repo, **_hub_kwargs(kernels.has_kernel, repo)):
            _fa3_status = f"{repo} has no build for this torch and SM{major}{minor}"
            return None
        _fa3 = kernels.get_kernel(repo, **_hub_kwargs(kernels.get_kernel, repo)).flash_attn_interface
        _fa3_status = f"FA3 from {repo}@{FA3_REVISIONS[repo][:7]} (kernels {version})"
    except Exception as e:
        _fa3_status = f"FA3 from {repo} failed to load with kernels {version} ({type(e).__name__}: {e})"
    return _fa3


def fa3_status() -> str:
    load_fa3()
    return _fa3_status


def is_full(window: int, seq_len: int) -> bool:
    """Does this window see the whole causal prefix at this length?"""
    return window < 0 or window >= seq_len - 1


def backend_name(window: int, seq_len: int, device, dtype) -> str:
    """Which backend attention() uses for this window at sequence length seq_len."""
    forced = forced_backend()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and load_fa3() is not None:
        return "fa3"
    if is_full(window, seq_len):
        return "sdpa"
    return "flex" if device.type == "cuda" else "sdpa"


def describe(windows, seq_len: int, device, dtype) -> str:
    """One line per distinct window: which layers have it and which backend runs it."""
    lines = []
    for window in sorted(set(windows)):
        layers = ",".join(str(i) for i, w in enumerate(windows) if w == window)
        name = backend_name(window, seq_len, device, dtype)
        span = "full context" if is_full(window, seq_len) else f"window {window}"
        if name == "sdpa":
            name = "sdpa (causal)" if is_full(window, seq_len) else "sdpa with a dense T x T mask (SLOW)"
        lines.append(f"attention at T={seq_len}, {span} (layers {layers}): {name}")
    if torch.device(device).type == "cuda" and forced_backend() is None:
        lines.append(f"attention: {fa3_status()}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The backends. All take and return (B, T, H, D).


@dataclass
class Packing:
    """Sequences that share a prefix, packed into one row: the prefix once, then the rest of each
    sequence. A token sees the earlier tokens of its own sequence and nothing else.
    - positions: (B, T) long, each token's position in its own sequence (RoPE, windows)
    - segments:  (B, T) long, 0 for the shared prefix (seen by every sequence of the row), s > 0
      for the tokens of sequence s only; padding gets its own segment, so it sees itself
    - prev:      (B, T) long, row index of the token before this one in its sequence (any value at
      position 0), for smear
    Plain causal rows are positions 0..T-1, one segment and prev = index - 1."""
    positions: torch.Tensor
    segments: torch.Tensor
    prev: torch.Tensor
    _masks: dict = field(default_factory=dict, repr=False)  # per window, shared by the layers

    def mask(self, window: int) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query r may attend to key c."""
        if window not in self._masks:
            T = self.positions.size(1)
            idx = torch.arange(T, device=self.positions.device)
            seg_q, seg_k = self.segments[:, :, None], self.segments[:, None, :]
            visible = (idx[None, None, :] <= idx[None, :, None]) & ((seg_k == 0) | (seg_k == seg_q))
            if window >= 0:
                visible &= self.positions[:, :, None] - self.positions[:, None, :] <= window
            self._masks[window] = visible[:, None]
        return self._masks[window]


def attention(q, k, v, window: int, packing: Packing | None = None):
    if packing is not None:
        return sdpa_packed_attention(q, k, v, packing.mask(window))
    name = backend_name(window, q.size(1), q.device, q.dtype)
    if name == "fa3":
        return fa3_attention(q, k, v, window)
    if name == "flex":
        return flex_window_attention(q, k, v, window)
    return sdpa_attention(q, k, v, window)


def fa3_attention(q, k, v, window: int):
    fa3 = load_fa3()
    if fa3 is None:
        raise PicochatError(f"attention backend fa3 was forced but {fa3_status()}")
    left = -1 if is_full(window, q.size(1)) else window
    y = fa3.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp


# Masks are cached per (kind, T, window, device) and built outside any torch.compile trace
# (inductor on CPU cannot lower flex_attention on a block mask built inside the graph).
# The training length's masks are pinned before the model is compiled: the compiled graph then
# only reads them (building one mid-trace would split it at every layer), and evaluation, which
# sees many lengths and keeps only the most recent in a small LRU cache, cannot evict them.
MAX_CACHED_MASKS = 16
_pinned = {}
_masks = OrderedDict()


def mask_kind(window: int, seq_len: int, device, dtype):
    """"dense", "block" or None: the mask attention() needs for this window and length."""
    name = backend_name(window, seq_len, device, dtype)
    if name == "flex":
        return "block"
    return "dense" if name == "sdpa" and not is_full(window, seq_len) else None


def pin_masks(windows, seq_len: int, device, dtype):
    """Build and keep for good the masks that attention() will need at seq_len."""
    for window in set(windows):
        kind = mask_kind(window, seq_len, device, dtype)
        key = (kind, seq_len, window, torch.device(device))
        if kind is not None and key not in _pinned:
            _pinned[key] = _build_mask(kind, seq_len, window, torch.device(device))


def cached_mask(kind: str, seq_len: int, window: int, device):
    key = (kind, seq_len, window, torch.device(device))
    if key in _pinned:
        return _pinned[key]
    if key in _masks:
        _masks.move_to_end(key)
    else:
        _masks[key] = _build_mask(kind, seq_len, window, torch.device(device))
        if len(_masks) > MAX_CACHED_MASKS:
            _masks.popitem(last=False)
    return _masks[key]


@torch.compiler.disable
def _build_mask(kind, seq_len, window, device):
    if is_full(window, seq_len):
        window = seq_len
    if kind == "dense":  # (T, T) bool, True where query r may attend to key c
        r = torch.arange(seq_len, device=device)[:, None]
        c = torch.arange(seq_len, device=device)[None, :]
        return (c <= r) & (r - c <= window)
    # FlexAttention block mask. The window is captured as a tensor, not a Python int, so all
    # windows share one compiled kernel instead of recompiling per window.
    w = torch.tensor(window, device=device)

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= w)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def sdpa_attention(q, k, v, window: int):
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if is_full(window, T):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = cached_mask("dense", T, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def sdpa_packed_attention(q, k, v, mask):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def cached_attention(q, k_cache, v_cache, pos: int, window: int, pad=None):
    """Attention for T new queries (B, T, H, D) at positions pos..pos+T-1 over a KV cache that
    already holds their keys and values, (B, Hkv, >= pos+T, D): the layout SDPA reads, so a slice
    needs no copy. Query p sees the cached keys c with p - window <= c <= p, exactly the keys
    training's causal sliding window gives it. pad: (B,) left-padding slots per row (None: none);
    a row's padding keys are hidden from its real queries, and a padding query sees only its own
    key (a query that sees nothing would give NaN, which its value would carry into real rows).
    SDPA on every device (FA3's cached kernel would be faster on Hopper: not used yet); only the
    keys a window can reach are read."""
    T = q.size(1)
    end = pos + T
    start = 0 if window < 0 else max(0, pos - window)
    k, v = k_cache[:, :, start:end], v_cache[:, :, start:end]
    mask = None
    if T > 1 or pad is not None:  # an unpadded decode step (T = 1) sees every key of its slice
        r = torch.arange(pos, end, device=q.device)[:, None]
        c = torch.arange(start, end, device=q.device)[None, :]
        mask = (c <= r) & ((r - c <= window) if window >= 0 else True)
        if pad is not None:
            mask = ((mask & (c >= pad[:, None, None])) | (c == r)).unsqueeze(1)  # (B, 1, T, S)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=q.size(2) != k.size(1))
    return y.transpose(1, 2)


# Without compile, flex_attention materializes the full score matrix; compiled it is a fused kernel.
# Default (automatic) dynamic shapes: training compiles once for its fixed T, and the first other
# length recompiles once with a symbolic T, so evals and generation do not recompile per length.
_flex_compiled = torch.compile(flex_attention)


def flex_window_attention(q, k, v, window: int, compiled: bool = True):
    T = q.size(1)
    block_mask = cached_mask("block", T, window, q.device)
    fn = _flex_compiled if compiled else flex_attention
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = fn(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)
