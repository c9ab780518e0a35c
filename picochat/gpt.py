"""The GPT: a pre-norm decoder-only Transformer in the style of modded-nanogpt/nanochat.

Ingredients, all without biases:
- parameter-free RMSNorm everywhere (F.rms_norm), also right after the token embedding
- rotary position embeddings (half-split layout) and QK-norm with a fixed logit sharpening
- ReLU^2 MLP
- value embeddings (ResFormer) with an input-dependent per-head gate on alternating layers
- per-layer learnable mixing of the residual stream with the initial embedding x0
- "smear": a cheap gated bigram mix of the previous token's embedding into the current one
- "backout": subtract a learned fraction of the middle layer's output before the head
- sliding-window attention ("SSSL" pattern; the last layer always sees everything)
- untied embedding/unembedding and a tanh logit softcap computed in fp32

Precision: activations run in an explicit compute dtype passed to GPT(config, compute_dtype)
(no autocast). Every matrix and scalar is stored in fp32 and the custom Linear casts its weight
to the input's dtype on the fly. The embeddings (wte, value embeddings) are stored in the compute
dtype itself, so in bf16 (CUDA's default) they are bf16 weights (AdamW computes their update in
fp32 and rounds the result to bf16); only with an fp16 compute dtype are they kept in fp32
(GradScaler cannot unscale fp16 gradients).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.attention import attention, cached_attention, describe, pin_masks
from picochat.common import PicochatError
from picochat.recipes import RECIPES

SOFTCAP = 15.0
SMEAR_CHANNELS = 24  # smear_gate reads this many leading channels of the normed embedding
PAD_VOCAB_TO = 64


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    preset: str = "default"  # a key of RECIPES


def config_from_depth(depth, vocab_size, max_seq_len=2048, aspect_ratio=64, head_dim=128, window_pattern="SSSL",
                      preset="default") -> GPTConfig:
    """Everything follows from depth: width = depth * aspect_ratio, rounded up to whole heads
    so that odd depths still get head_dim-sized heads."""
    if depth < 1:
        raise PicochatError(f"depth must be at least 1, got {depth}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern, preset=preset)


def validate_config(config: GPTConfig):
    if min(config.n_layer, config.n_head, config.n_kv_head, config.sequence_len) < 1:
        raise PicochatError(f"n_layer, n_head, n_kv_head and sequence_len must be positive: {config}")
    if config.preset not in RECIPES:
        raise PicochatError(f"unknown preset {config.preset!r} (choose one of {', '.join(RECIPES)})")
    pattern = config.window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise PicochatError(f"window pattern {config.window_pattern!r} must be made of S and L")
    if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
        raise PicochatError(f"n_embd {config.n_embd} must split into {config.n_head} heads of even size")
    gate_inputs = max(SMEAR_CHANNELS, RECIPES[config.preset].ve_gate_channels)
    if config.n_embd < gate_inputs:
        raise PicochatError(f"n_embd {config.n_embd} is narrower than the {gate_inputs} channels the gates read")
    if config.n_head % config.n_kv_head:
        raise PicochatError(f"n_head {config.n_head} must be a multiple of n_kv_head {config.n_kv_head}")


def window_sizes(config: GPTConfig) -> list:
    """Attention window per layer: the pattern tiled over the layers, last layer always L."""
    recipe = RECIPES[config.preset]
    long = config.sequence_len
    short = math.ceil(long * recipe.short_window_frac / 128) * 128
    pattern = config.window_pattern.upper()
    sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Alternating layers, counted back from the last one, which always has one."""
    return layer % 2 == (n_layer - 1) % 2


# ---------------------------------------------------------------------------
# Building blocks


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free Linear whose (fp32) weight is cast to the activation dtype on the fly."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def apply_rotary(x, cos, sin):
    """Half-split (NeoX) rotary embedding on (B, T, H, D). This rotates by -angle, matching
    the reference's convention (needed to share checkpoints)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, window: int):
        super().__init__()
        recipe = RECIPES[config.preset]
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = window  # known per layer, so a KV cache can reuse it
        self.qk_scale = recipe.qk_scale
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd)
        self.ve_gate = None
        if has_value_embedding(layer, config.n_layer):
            self.ve_gate_channels, self.ve_gate_range = recipe.ve_gate_channels, recipe.ve_gate_range
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head)

    def forward(self, x, ve, cos, sin, packing=None, kv=None):
        """kv: (k_cache, v_cache, pos, pad) of this layer when decoding with a KV cache (see
        engine.py): the new keys and values are written at pos.., then attended over with the
        cached ones, hiding each row's left padding (pad: None or (B,) slots)."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual, gated per kv head by the current token's own input
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale
        if kv is None:
            y = attention(q, k, v, self.window, packing)
        else:
            k_cache, v_cache, pos, pad = kv
            k_cache[:, :, pos:pos + T], v_cache[:, :, pos:pos + T] = k.transpose(1, 2), v.transpose(1, 2)
            y = cached_attention(q, k_cache, v_cache, pos, self.window, pad)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, window: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer, window)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, packing=None, kv=None):
        x = x + self.attn(norm(x), ve, cos, sin, packing, kv)
        return x + self.mlp(norm(x))


# ---------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype=torch.float32):
        """Usually built on the meta device (see build_model): nothing set here is real,
        init_weights() must set every parameter and buffer."""
        super().__init__()
        validate_config(config)
        self.config = config
        self.recipe = RECIPES[config.preset]
        self.compute_dtype = compute_dtype
        # fp16 embeddings would get fp16 grads, which GradScaler cannot unscale: keep those fp32
        self.embed_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        self.padded_vocab = math.ceil(config.vocab_size / PAD_VOCAB_TO) * PAD_VOCAB_TO
        self.window_sizes = window_sizes(config)
        L, d = config.n_layer, config.n_embd
        kv_dim = config.n_kv_head * (d // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(self.padded_vocab, d),
            "h": nn.ModuleList([Block(config, i, self.window_sizes[i]) for i in range(L)]),
        })
        self.lm_head = Linear(d, self.padded_vocab)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(self.padded_vocab, kv_dim) for i in range(L) if has_value_embedding(i, L)
        })
        self.resid_lambdas = nn.Parameter(torch.empty(L))
        self.x0_lambdas = nn.Parameter(torch.empty(L))
        if self.recipe.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if self.recipe.backout:
            self.backout_lambda = nn.Parameter(torch.empty(1))
        # rotary tables for 10x the training length (generation may run past it); not checkpointed
        self.rotary_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self):
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        # 1 / theta^(i/d) as the reference writes it: theta^(-i/d) differs by an ulp in some frequencies
        inv_freq = 1.0 / (self.recipe.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                                                     / head_dim))
        angles = torch.outer(torch.arange(self.rotary_len, dtype=torch.float32, device=device), inv_freq)
        return (angles.cos().to(self.compute_dtype)[None, :, None, :],
                angles.sin().to(self.compute_dtype)[None, :, None, :])

    @torch.no_grad()
    def init_weights(self):
        """Set every parameter and buffer (after to_empty, memory holds garbage)."""
        r, L, d = self.recipe, self.config.n_layer, self.config.n_embd
        s = math.sqrt(3.0 / d)  # uniform(-s, s) has std 1/sqrt(d)
        for emb in [self.transformer.wte, *self.value_embeds.values()]:
            emb.to(dtype=torch.float32)  # init in fp32 whatever the storage dtype, then cast
        # The reference's order of draws from the one seed, so the same seed gives the same weights
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=r.wte_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.uniform_(block.mlp.c_fc.weight, -r.c_fc_scale * s, r.c_fc_scale * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # per-layer ramps in Python floats, as the reference computes them, then rounded to fp32 once
        ramp = lambda start, drop: torch.tensor([start - drop * i / max(L - 1, 1) for i in range(L)])
        self.resid_lambdas.copy_(ramp(*r.resid_lambda_init))
        self.x0_lambdas.copy_(ramp(*r.x0_lambda_init))
        if r.backout:
            self.backout_lambda.fill_(0.2)
        if r.smear:
            self.smear_lambda.fill_(0.0)
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, r.ve_gate_init)
        self.cos, self.sin = self._rotary_tables()
        for emb in [self.transformer.wte, *self.value_embeds.values()]:
            emb.to(dtype=self.embed_dtype)

    def get_device(self):
        return self.transformer.wte.weight.device

    def attention_summary(self) -> str:
        return describe(self.window_sizes, self.config.sequence_len, self.get_device(), self.compute_dtype)

    # -- accounting ---------------------------------------------------------------------------

    def num_scaling_params(self) -> dict:
        count = lambda module: sum(p.numel() for p in module.parameters())
        counts = {
            "wte": count(self.transformer.wte),
            "value_embeds": count(self.value_embeds),
            "lm_head": count(self.lm_head),
            "transformer_matrices": count(self.transformer.h),
            "scalars": sum(p.numel() for p in self._scalar_params()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is not accounted for"
        return counts

    def _scalar_params(self):
        params = [self.resid_lambdas, self.x0_lambdas]
        if self.recipe.smear:
            params += [self.smear_gate.weight, self.smear_lambda]
        if self.recipe.backout:
            params.append(self.backout_lambda)
        return params

    def num_matmul_params(self) -> int:
        """Weights of every custom Linear: block matrices (incl. ve_gate), padded lm_head, smear_gate."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def estimate_flops(self) -> float:
        """Training (forward + backward) FLOPs per token at sequence_len: 6 per matmul weight,
        plus 12 * h * d per visible key for the attention scores and the weighted sum."""
        T, h = self.config.sequence_len, self.config.n_head
        head_dim = self.config.n_embd // h
        attn = sum(12 * h * head_dim * min(w, T) for w in self.window_sizes)
        return float(6 * self.num_matmul_params() + attn)

    # -- optimizer ----------------------------------------------------------------------------

    def optimizer_groups(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         scalar_lr=0.5) -> list:
        """Param groups for MuonAdamW: AdamW for embeddings, head and scalars (lrs scaled by
        1/sqrt(width/768)), Muon for everything inside the blocks, one group per shape."""
        r = self.recipe
        dls = (self.config.n_embd / 768) ** -0.5

        def adamw(name, params, lr):
            betas, wd = r.adamw[name]
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd, initial_lr=lr)

        groups = [
            adamw("lm_head", list(self.lm_head.parameters()), unembedding_lr * dls),
            adamw("wte", list(self.transformer.wte.parameters()), embedding_lr * dls),
            adamw("value_embeds", list(self.value_embeds.parameters()), r.ve_lr_mult * embedding_lr * dls),
            adamw("resid_lambdas", [self.resid_lambdas], 0.01 * scalar_lr),
            adamw("x0_lambdas", [self.x0_lambdas], scalar_lr),
        ]
        smear = self._scalar_params()[2:]  # smear_gate, smear_lambda, backout_lambda, where present
        if smear:
            groups.append(adamw("smear", smear, 0.2))  # fixed lr: not width- or batch-scaled
        block_params = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in block_params}):
            params = [p for p in block_params if tuple(p.shape) == shape]
            groups.append(dict(kind="muon", params=params, lr=matrix_lr, momentum=0.95, ns_steps=5,
                               beta2=r.muon_beta2, weight_decay=weight_decay, initial_lr=matrix_lr))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        return groups

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5):
        from picochat.optim import MuonAdamW

        groups = self.optimizer_groups(unembedding_lr, embedding_lr, matrix_lr, weight_decay, scalar_lr)
        # Polar Express runs in bf16 only when we compute in bf16; fp16 is unstable there
        muon_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        r = self.recipe
        return MuonAdamW(groups, muon_dtype=muon_dtype, polar_express_norm=r.polar_express_norm, muon_eq=r.muon_eq,
                         muon_plus=r.muon_plus)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, idx, targets=None, loss_reduction="mean", packing=None, cache=None):
        """Logits (B, T, vocab) in fp32, or the loss if targets are given. Each row of idx is one
        causal sequence, or several that share a prefix when a Packing says so (see attention.py).
        With a KV cache (engine.KVCache) idx continues the cached rows at position cache.pos, and
        the cache advances by T: the same computation as the full sequence, token for token (and,
        for left-padded rows, as each row alone, up to rounding)."""
        B, T = idx.shape
        pos = 0 if cache is None else cache.pos
        length = pos + T if packing is None else int(packing.positions.max()) + 1
        if length > self.rotary_len:
            raise PicochatError(f"sequence of {length} tokens is longer than the rotary table ({self.rotary_len})")
        if packing is None:
            cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        else:
            cos, sin = self.cos[0, packing.positions], self.sin[0, packing.positions]  # (B, T, 1, D/2)
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if cache is not None and cache.pad is not None:
            # Zero a left-padded row's padding: its first real token then smears in nothing, as
            # position 0 of an unpadded row does. Rotary angles need no shift: attention scores
            # depend only on the distance between positions.
            real = torch.arange(pos, pos + T, device=idx.device) >= cache.pad[:, None]
            x = x * real.unsqueeze(-1).to(x.dtype)
        if self.recipe.smear:
            x = self.smear(x, packing, cache)
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            # 0-d fp32 lambdas do not promote bf16 activations
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            kv = None if cache is None else (cache.k[i], cache.v[i], pos, cache.pad)
            x = block(x, ve, cos, sin, packing, kv)
            if i == self.config.n_layer // 2:
                x_mid = x
        if cache is not None:
            cache.pos += T
        if self.recipe.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def smear(self, x, packing=None, cache=None):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1} for t >= 1, using the
        pre-smear x_{t-1}. Crosses document boundaries. Under a Packing, x_{t-1} is the previous
        token of the same sequence; under a KV cache, the first new token's x_{t-1} is the cache's
        last one, so decoding and a prefill in chunks mix exactly as one full forward does."""
        # The order of these ops is part of the result: autograd sums x's gradient contributions
        # in the order the slices were made, and training's figures are kept bit for bit.
        gate_of = lambda x: self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if packing is not None:
            gate = gate_of(x)
            x_prev = torch.gather(x, 1, packing.prev.unsqueeze(-1).expand_as(x))
            return x + (packing.positions > 0).unsqueeze(-1) * gate * x_prev
        if cache is not None:
            prev, cache.prev = cache.prev, x[:, -1:]
            if prev is not None:
                return x + gate_of(x) * torch.cat([prev, x[:, :-1]], dim=1)
        gate = gate_of(x[:, 1:])
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def cast_for_inference(self):
        """Store every matrix in the compute dtype once, so inference does not cast an fp32 copy
        at every matmul (the cast training does gives the same values, so outputs are unchanged).
        The 0-d lambdas stay fp32, as in training. No training after this."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight.data = module.weight.data.to(self.compute_dtype)
        return self.eval().requires_grad_(False)


def build_model(config: GPTConfig, device, compute_dtype) -> GPT:
    """Construct on the meta device (no memory, no wasted init), materialize on `device`,
    then initialize every tensor explicitly."""
    with torch.device("meta"):
        model = GPT(config, compute_dtype)
    model.to_empty(device=device)
    model.init_weights()
    pin_masks(model.window_sizes, config.sequence_len, device, compute_dtype)  # before any torch.compile
    return model
