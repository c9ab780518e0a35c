"""A picochat GPT for Hugging Face transformers, written out by `picochat export` beside the weights.

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

This file stands alone (torch and transformers only): a shared model loads where picochat is not
installed. It computes what picochat's own model (picochat/gpt.py) computes, in the same order:
- parameter-free RMSNorm, also right after the token embedding; bias-free linears
- rotary embeddings (half-split, rotating by -angle), then QK-norm scaled by qk_scale
- value embeddings on alternating layers, mixed into v by a per-kv-head sigmoid gate
- per-layer mixing of the residual stream with the first embedding x0 (resid/x0 lambdas)
- smear: the previous token's embedding mixed into the current one by a learned gate
- backout: a learned fraction of the middle layer's output subtracted before the head
- sliding-window attention per layer; ReLU^2 MLP; untied head; tanh softcap in fp32

transformers' own NanoChat class has none of value embeddings, smear, backout, the lambdas, sliding
windows or the QK gain, which is why the export ships this file.

Caching: generate() runs through transformers' DynamicCache, which keeps every key; each layer's
window is applied by the mask. Smear needs the token before the first new one, which a cache
does not hold, so generation passes it along (prev_token_ids, see prepare_inputs_for_generation).
Positions are cache slots, as in picochat's engine: with left padding, rotary angles need no shift
(scores depend only on the distance between positions) and the padding's embeddings are zeroed,
so a padded row computes what it would alone, up to rounding.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed the output's cache field from past_key_values to cache during 5.x
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=2048, window_sizes=None,
                 value_embed_layers=None, rotary_base=100_000.0, qk_scale=1.2, ve_gate_channels=12,
                 ve_gate_range=3.0, smear_channels=24, smear=True, backout=True, logit_softcap=15.0, use_cache=True,
                 **kwargs):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size  # embeddings and head are padded to a multiple of 64
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings  # the training length (longer runs are allowed)
        # query p sees keys p - w .. p; named so that transformers does not build a sliding-window
        # cache (it would drop keys this model's mask still expects to index)
        self.window_sizes = window_sizes or [max_position_embeddings] * num_hidden_layers
        self.value_embed_layers = value_embed_layers or []
        self.rotary_base = rotary_base
        self.qk_scale = qk_scale
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_range = ve_gate_range
        self.smear_channels = smear_channels
        self.smear = smear
        self.backout = backout
        self.logit_softcap = logit_softcap
        self.use_cache = use_cache
        super().__init__(**kwargs)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.window = config.window_sizes[layer]
        self.qk_scale = config.qk_scale
        d = config.hidden_size
        self.c_q = linear(d, self.n_head * self.head_dim)
        self.c_k = linear(d, self.n_kv_head * self.head_dim)
        self.c_v = linear(d, self.n_kv_head * self.head_dim)
        self.c_proj = linear(self.n_head * self.head_dim, d)
        self.ve_gate = None
        if layer in config.value_embed_layers:
            self.ve_gate_channels, self.ve_gate_range = config.ve_gate_channels, config.ve_gate_range
            self.ve_gate = linear(self.ve_gate_channels, self.n_kv_head)

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * self.qk_scale, norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = linear(config.hidden_size, 4 * config.hidden_size)
        self.c_proj = linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def __init__(self, config: PicochatConfig):
        super().__init__(config)
        c = config
        kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        # module names are picochat's own: the weights load with no renaming either way
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(c.padded_vocab_size, c.hidden_size),
            "h": nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)]),
        })
        self.lm_head = linear(c.hidden_size, c.padded_vocab_size)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(c.padded_vocab_size, kv_dim)
                                           for i in c.value_embed_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(c.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(c.num_hidden_layers))
        if c.smear:
            self.smear_gate = linear(c.smear_channels, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if c.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        # Only a model made from a config alone (not from_pretrained) keeps these values.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def rotary(self, positions, dtype):
        """cos, sin (1, T, 1, head_dim / 2) at these positions, as picochat's tables hold them."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        angles = torch.outer(positions.float(), 1.0 / (self.config.rotary_base ** steps))
        return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]

    def masks(self, past, T, attention_mask):
        """Per distinct window, the (B or 1, 1, T, past + T) keys each new query sees: its window of
        the causal prefix, less the padding (attention_mask == 0); a padding query sees itself only,
        as a query that sees nothing gives NaN, which would flow into the real rows."""
        device = self.transformer.wte.weight.device
        r = torch.arange(past, past + T, device=device)[:, None]
        c = torch.arange(past + T, device=device)[None, :]
        masks = {}
        for w in set(self.config.window_sizes):
            mask = (c <= r) & (r - c <= w)
            if attention_mask is not None:
                mask = (mask & attention_mask[:, None, :].bool()) | (c == r)
            masks[w] = mask.unsqueeze(-3) if attention_mask is not None else mask[None, None]
        return masks

    def smear(self, x, prev):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:smear_channels])) * x_{t-1}, with the
        pre-smear x_{t-1}; prev is x_{-1} (the token before the first new one) or None."""
        gate_of = lambda x: self.smear_lambda.to(x.dtype) * torch.sigmoid(
            self.smear_gate(x[..., : self.config.smear_channels]))
        if prev is not None:
            return x + gate_of(x) * torch.cat([prev, x[:, :-1]], dim=1)
        gate = gate_of(x[:, 1:])
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                labels=None, prev_token_ids=None, logits_to_keep=0, **kwargs):
        """input_ids (B, T) continue the cache's rows (or start them). attention_mask: None or (B, past + T)
        with 0 at left padding. prev_token_ids: (B, 1), the token before input_ids[:, 0], needed when
        the cache is not empty (generate passes it). labels: as input_ids (-100 ignored), shifted
        here. position_ids are ignored: positions are cache slots (see the module docstring)."""
        if input_ids is None:
            raise ValueError("picochat models take input_ids (inputs_embeds cannot carry value embeddings)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.size(1) != past + T):
            raise ValueError(f"attention_mask must be (batch, {past + T}): the cached and the new tokens")
        if past > 0 and prev_token_ids is None and self.config.smear:
            raise ValueError("continuing a cache needs prev_token_ids, the token before input_ids (smear reads it)")
        dtype = self.transformer.wte.weight.dtype
        cos, sin = self.rotary(torch.arange(past, past + T, device=input_ids.device), dtype)
        masks = self.masks(past, T, attention_mask)

        x = norm(self.transformer.wte(input_ids))
        if attention_mask is not None:
            x = x * attention_mask[:, past:, None].to(x.dtype)  # the padding smears in nothing
        if self.config.smear:
            prev = None
            if past > 0:
                prev = norm(self.transformer.wte(prev_token_ids))
                if attention_mask is not None:
                    prev = prev * attention_mask[:, past - 1:past, None].to(prev.dtype)
            x = self.smear(x, prev)
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[block.attn.window], cache)
            if i == self.config.num_hidden_layers // 2:
                x_mid = x
        if self.config.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs["input_ids"].size(1)
        if new < input_ids.size(1):
            inputs["prev_token_ids"] = input_ids[:, -new - 1:-new]
        return inputs

