"""Recipes: the architecture, initialisation, optimizer and training-schedule constants that
changed over the reference's history, one frozen dataclass per preset. The model (gpt.py), the
optimizer (optim.py) and the training stages read everything preset-specific from here.

"default" is the current reference recipe; "jan29" the 2026-01-29 leaderboard record
(docs/jan29.md: which of its values are stated by the record and which are inferred).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    rope_theta: float
    short_window_frac: float  # S window = ceil(T * frac / 128) * 128
    qk_scale: float  # q and k are each multiplied by this after QK-norm
    ve_gate_channels: int  # ve_gate reads this many leading channels of the block input
    ve_gate_range: float  # gate = range * sigmoid(...)
    smear: bool
    backout: bool
    wte_std: float
    c_fc_scale: float  # c_fc ~ U(-c_fc_scale*s, c_fc_scale*s), s = sqrt(3/n_embd)
    ve_gate_init: float  # ve_gate ~ U(0, ve_gate_init) (0 means zeros)
    # (layer 0's value, its drop to the last layer): layer i gets start - drop * i / (L - 1)
    resid_lambda_init: tuple
    x0_lambda_init: tuple
    # AdamW groups: name -> (betas, weight_decay); value_embeds lr = ve_lr_mult * embedding lr
    adamw: dict
    ve_lr_mult: float
    muon_beta2: float
    # base_train's values for the flags left unset: lrs (before the batch-size lr scale), the Muon
    # weight decay (before wd_scaling), warmup_steps, warmdown_ratio, final_lr_frac, total_batch_size
    train_defaults: dict
    # Schedules base_train applies each step (N = number of steps; the warmdown is the lr's last
    # round(warmdown_ratio * N) steps). Muon momentum: momentum_start -> momentum_peak linearly over
    # the first momentum_warmup steps, then momentum_peak, then linearly to momentum_final at step N
    # over the warmdown (momentum_final = momentum_peak: no momentum warmdown).
    momentum_start: float
    momentum_peak: float
    momentum_warmup: int
    momentum_final: float
    wd_schedule: str  # Muon weight decay from its start value to 0 at step N: "cosine" or "linear"
    # Muon weight decay at step 0 from --weight-decay wd: "t_epoch" = wd * sqrt(B/B_REF) * D_REF/D
    # (B_REF/D_REF: batch and tokens of d12), "depth_squared" = wd * (12/depth)^2
    wd_scaling: str
    # Muon variant (optim.MuonAdamW)
    polar_express_norm: float  # X / (polar_express_norm * |X|_F) before Polar Express
    muon_eq: bool  # MuonEq: equal row norms before Polar Express
    muon_plus: bool  # Muon+: rescale to |X|_F = sqrt(min(m, n)) after it


RECIPES = {
    # The current reference recipe (after autoresearch round 2, 2026-03-14, plus later fixes).
    "default": Recipe(
        rope_theta=100_000.0, short_window_frac=0.25, qk_scale=1.2,
        ve_gate_channels=12, ve_gate_range=3.0, smear=True, backout=True,
        wte_std=0.8, c_fc_scale=0.4, ve_gate_init=0.02,
        resid_lambda_init=(1.15, 0.10), x0_lambda_init=(0.20, 0.15),
        adamw={
            "lm_head": ((0.8, 0.96), 0.01),
            "wte": ((0.8, 0.995), 0.001),
            "value_embeds": ((0.8, 0.995), 0.01),
            "resid_lambdas": ((0.8, 0.95), 0.05),
            "x0_lambdas": ((0.96, 0.95), 0.0),
            "smear": ((0.8, 0.95), 0.0),
        },
        ve_lr_mult=0.5, muon_beta2=0.9,
        train_defaults=dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.28, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05,
                            total_batch_size=-1),
        momentum_start=0.85, momentum_peak=0.97, momentum_warmup=400, momentum_final=0.90,
        wd_schedule="cosine", wd_scaling="t_epoch",
        polar_express_norm=1.01, muon_eq=True, muon_plus=True,
    ),
    # The 2026-01-29 d24 leaderboard record (run #1, commit 348fbb3). Some values are stated by the
    # published record, the rest inferred: docs/jan29.md says which is which.
    "jan29": Recipe(
        rope_theta=10_000.0, short_window_frac=0.5, qk_scale=1.0,
        ve_gate_channels=32, ve_gate_range=2.0, smear=False, backout=False,
        wte_std=1.0, c_fc_scale=1.0, ve_gate_init=0.0,
        resid_lambda_init=(1.0, 0.0), x0_lambda_init=(0.1, 0.0),
        adamw={
            "lm_head": ((0.8, 0.95), 0.0),
            "wte": ((0.8, 0.95), 0.0),
            "value_embeds": ((0.8, 0.95), 0.0),
            "resid_lambdas": ((0.8, 0.95), 0.0),
            "x0_lambdas": ((0.96, 0.95), 0.0),
        },
        ve_lr_mult=1.0, muon_beta2=0.95,
        train_defaults=dict(embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.2, warmup_steps=0, warmdown_ratio=0.4, final_lr_frac=0.0,
                            total_batch_size=524_288),
        momentum_start=0.85, momentum_peak=0.95, momentum_warmup=300, momentum_final=0.95,
        wd_schedule="linear", wd_scaling="depth_squared",
        polar_express_norm=1.02, muon_eq=False, muon_plus=False,
    ),
}
