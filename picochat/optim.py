"""MuonAdamW: one optimizer for the whole model. Embeddings, the unembedding and the
scalars train with AdamW; every matrix inside the transformer blocks trains with Muon
(Polar Express orthogonalization + MuonEq + Muon+ + NorMuon + cautious weight decay;
MuonEq and Muon+ can be switched off and the Polar Express normalization factor set, for
the older recipes: see gpt.RECIPES).

There is no DDP wrapper. When torch.distributed is initialized with more than one rank,
step() averages the gradients itself and shards the optimizer state ZeRO-2 style: each
rank updates only its slice of every large tensor (and its chunk of every stack of Muon
matrices), then the updated values are all-gathered so every rank ends with identical
parameters. On one rank the same code runs with the communication left out.

Both update rules are torch.compile'd kernels. Hyperparameters reach them as 0-d CPU
tensors rather than Python floats, so schedules that change lr, momentum or weight decay
every step never trigger a recompile (a Python float would be baked into the graph)."""

import math

import torch
import torch.distributed as dist

from picochat.common import PicochatError

# torch 2.13 renamed the tensor collectives (the old names still work but warn);
# pyproject also allows older torch, which only has the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

# AdamW tensors smaller than this are all-reduced and updated whole on every rank;
# slicing them would cost more in collective launches than it saves.
SMALL_NUMEL = 1024

# Polar Express (a, b, c) per iteration, computed for 5 iterations with safety factor
# 2e-2 and cushion 2. Each iteration maps X to a·X + b·(XXᵀ)X + c·(XXᵀ)²X, pushing every
# singular value towards 1 while leaving the singular vectors alone.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


# ---------------------------------------------------------------------------
# Kernels


def _compiled(fn):
    """Compile with static shapes: one graph per (shape, dtype) seen. Dynamo's default cap
    of 8 graphs per function would be a hard error under fullgraph=True once a process sees
    more parameter shapes than that (a test session builds many models), so raise it."""
    return torch._dynamo.config.patch(recompile_limit=64)(torch.compile(fn, dynamic=False, fullgraph=True))


@_compiled
def adamw_update(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """One AdamW step on p in place. The arithmetic is fp32 whatever the storage dtype
    (bf16 embeddings and their bf16 moments), and results are cast back on store."""
    pf = p.float() * (1 - lr_t * wd_t)  # decoupled weight decay, scaled by the current lr
    g = grad.float()
    m = exp_avg.float().lerp(g, 1 - beta1_t)
    v = exp_avg_sq.float().lerp(g * g, 1 - beta2_t)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    # textbook bias correction: eps is added to the corrected sqrt(v)
    denom = (v / (1 - beta2_t**step_t)).sqrt() + eps_t
    p.copy_(pf - (lr_t / (1 - beta1_t**step_t)) * m / denom)


def _frobenius(x):
    """Frobenius norm of every matrix in a (K, m, n) stack, shaped (K, 1, 1)."""
    return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)


def polar_express(x, ns_steps: int, norm_factor=1.01):
    """Approximately orthogonalize every matrix of the stack x: same singular vectors,
    singular values pushed into a band around 1. Runs in x's dtype. norm_factor > 1 keeps
    the largest singular value safely below 1 after the normalization (a float or a 0-d tensor)."""
    m, n = x.shape[-2:]
    # all singular values now below 1; the factor is applied in fp32 (as a Python float would
    # be), not rounded to bf16 first as a 0-d tensor would be
    x = x / ((norm_factor * _frobenius(x).float()).to(x.dtype) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # iterate on the smaller Gram matrix: XXᵀ for wide, XᵀX for tall
        if m <= n:
            A = x @ x.mT
            x = a * x + (b * A + c * (A @ A)) @ x
        else:
            A = x.mT @ x
            x = a * x + x @ (b * A + c * (A @ A))
    return x


@_compiled
def muon_update(p, grad, momentum_buf, second_moment, momentum_t, lr_t, wd_t, beta2_t, norm_t, eq_t, plus_t,
                ns_steps: int, muon_dtype: torch.dtype):
    """One Muon step on a (K, m, n) stack of same-shape matrices, p updated in place.
    The Muon variant arrives as 0-d tensors like the other hyperparameters, so every recipe
    shares one graph per shape: norm_t is the Polar Express normalization factor, eq_t and
    plus_t are 1.0 or 0.0 to switch MuonEq and Muon+ on or off (s * f + (1 - s) is exactly f
    or exactly 1)."""
    m, n = p.shape[-2:]
    # Nesterov momentum
    momentum_buf.lerp_(grad, 1 - momentum_t)
    x = grad.lerp(momentum_buf, momentum_t).to(muon_dtype)
    # MuonEq: give every row the same norm, keeping the Frobenius norm
    row_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    x = x * (eq_t * (_frobenius(x) / math.sqrt(m) / row_norm.clamp_min(1e-6)) + (1 - eq_t))
    x = polar_express(x, ns_steps, norm_t).to(p.dtype)
    # Muon+: rescale to the Frobenius norm of an exactly semi-orthogonal matrix
    x = x * (plus_t * (math.sqrt(min(m, n)) / _frobenius(x).clamp_min(1e-10)) + (1 - plus_t))
    # NorMuon: divide each row (or column, for wide matrices) by its running RMS, then
    # restore the Frobenius norm, so only the relative scale between rows changes
    reduce_dim = -1 if m >= n else -2
    second_moment.lerp_(x.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2_t)
    scaled = x * second_moment.clamp_min(1e-10).rsqrt()
    x = scaled * (_frobenius(x) / _frobenius(scaled).clamp_min(1e-10))
    # cautious weight decay: only decay coordinates the update pushes towards zero anyway.
    # Tall matrices (c_fc) take sqrt(m/n) times the lr: that gives every update the same
    # per-entry RMS, 1/sqrt(n) with n the fan-in, whatever the aspect ratio.
    lr = lr_t * math.sqrt(max(1.0, m / n))
    mask = (x * p >= 0).to(p.dtype)
    p.sub_(lr * x + lr * wd_t * mask * p)


# ---------------------------------------------------------------------------
# Optimizer


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with kind="adamw" (params, lr, betas, eps, weight_decay) or
    kind="muon" (params all of one 2-D shape, lr, momentum, ns_steps, beta2, weight_decay).
    muon_dtype is the dtype of the Polar Express iteration: the compute dtype when that is
    bf16, fp32 otherwise (fp16 has too little range there and is mapped to fp32).
    The Muon variant is fixed at construction; the defaults are the current reference's
    (base_train passes its preset's, gpt.RECIPES): polar_express_norm divides X by
    polar_express_norm * |X|_F before Polar Express, muon_eq equilibrates the rows before it
    (MuonEq), muon_plus rescales the result to |X|_F = sqrt(min(m, n)) after it (Muon+)."""

    ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
    MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")

    def __init__(self, param_groups, muon_dtype=torch.float32, polar_express_norm=1.01, muon_eq=True,
                 muon_plus=True):
        groups = []
        for group in param_groups:
            group = dict(group, params=list(group["params"]))
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
            required = self.ADAMW_KEYS if kind == "adamw" else self.MUON_KEYS
            missing = [k for k in required if k not in group]
            if missing:
                raise ValueError(f"{kind} param group is missing {missing}")
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a muon group needs matrices all of one shape, got {sorted(shapes)}")
                if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
                    raise ValueError(f"ns_steps must be 1..{len(POLAR_EXPRESS_COEFFS)}, got {group['ns_steps']}")
            group["initial_lr"] = group["lr"]  # schedules multiply this
            groups.append(group)
        super().__init__(groups, defaults={})
        self.muon_dtype = torch.float32 if muon_dtype == torch.float16 else muon_dtype
        self.polar_express_norm = float(polar_express_norm)
        self.muon_eq, self.muon_plus = bool(muon_eq), bool(muon_plus)
        # the 0-d CPU tensors through which hyperparameters reach the compiled kernels
        scalar = lambda value=0.0: torch.tensor(float(value), dtype=torch.float32)
        self._step_t, self._lr_t, self._beta1_t, self._beta2_t = scalar(), scalar(), scalar(), scalar()
        self._eps_t, self._wd_t, self._momentum_t = scalar(), scalar(), scalar()
        self._norm_t, self._eq_t, self._plus_t = scalar(polar_express_norm), scalar(muon_eq), scalar(muon_plus)

    @torch.no_grad()
    def step(self):
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        # Phase 1: launch every gradient reduction, so communication overlaps the updates.
        # SUM then divide rather than ReduceOp.AVG: gloo rejected AVG until recent torch
        # (2.7 still did; 2.13 accepts it), and this keeps gloo and NCCL on the same code.
        reductions = []
        for group in self.param_groups:
            launch = self._launch_adamw if group["kind"] == "adamw" else self._launch_muon
            reductions.append(launch(group, world))
        # Phase 2: per group, wait for its gradients, update the owned part, start the gather
        gathers = []
        for group, reduction in zip(self.param_groups, reductions):
            update = self._update_adamw if group["kind"] == "adamw" else self._update_muon
            gathers.extend(update(group, reduction, rank, world))
        # Phase 3: wait for the gathers; Muon results come back stacked and are unstacked
        for work, params, stacked in gathers:
            work.wait()
            if params is not None:
                torch._foreach_copy_(params, list(stacked[: len(params)].unbind(0)))

    # --- AdamW: small tensors all-reduced whole, large ones sharded along dim 0

    def _launch_adamw(self, group, world):
        reduction = []
        for p in group["params"]:
            grad = _grad_of(p)
            if world == 1:
                reduction.append((None, grad))
            elif p.numel() < SMALL_NUMEL:
                reduction.append((dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True), grad))
            else:
                if p.shape[0] % world != 0:
                    raise PicochatError(f"cannot shard a parameter of shape {tuple(p.shape)} over {world} ranks: "
                                        f"its first dimension must be divisible by the world size")
                grad_slice = grad.new_empty((p.shape[0] // world, *p.shape[1:]))
                reduction.append((_reduce_scatter(grad_slice, grad, op=dist.ReduceOp.SUM, async_op=True), grad_slice))
        return reduction

    def _update_adamw(self, group, reduction, rank, world):
        beta1, beta2 = group["betas"]
        self._lr_t.fill_(group["lr"])
        self._beta1_t.fill_(beta1)
        self._beta2_t.fill_(beta2)
        self._eps_t.fill_(group["eps"])
        self._wd_t.fill_(group["weight_decay"])
        gathers = []
        for p, (work, grad) in zip(group["params"], reduction):
            if work is not None:
                work.wait()
                grad.div_(world)
            owned = p
            if world > 1 and p.numel() >= SMALL_NUMEL:  # we own rows [rank*rows, (rank+1)*rows)
                rows = p.shape[0] // world
                owned = p[rank * rows:(rank + 1) * rows]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(owned)
                state["exp_avg_sq"] = torch.zeros_like(owned)
            state["step"] += 1
            self._step_t.fill_(state["step"])
            adamw_update(owned, grad, state["exp_avg"], state["exp_avg_sq"], self._step_t, self._lr_t,
                         self._beta1_t, self._beta2_t, self._eps_t, self._wd_t)
            if owned is not p:  # in place: our slice of p is this rank's input to the gather
                gathers.append((_all_gather(p, owned, async_op=True), None, None))
        return gathers

    # --- Muon: the group's K matrices stacked; rank r owns stack rows [r*c, (r+1)*c)

    def _launch_muon(self, group, world):
        params = group["params"]
        grads = torch.stack([_grad_of(p) for p in params])
        if world == 1:
            return None, grads, None
        chunk = math.ceil(len(params) / world)
        if chunk * world > len(params):  # zero-pad so the stack splits evenly
            grads = torch.cat([grads, grads.new_zeros((chunk * world - len(params), *grads.shape[1:]))])
        grad_chunk = grads.new_empty((chunk, *grads.shape[1:]))
        return _reduce_scatter(grad_chunk, grads, op=dist.ReduceOp.SUM, async_op=True), grad_chunk, grads

    def _update_muon(self, group, reduction, rank, world):
        work, grad_chunk, gather_buf = reduction
        params = group["params"]
        chunk = grad_chunk.shape[0]
        lo, hi = min(rank * chunk, len(params)), min((rank + 1) * chunk, len(params))
        if work is not None:
            work.wait()
            grad_chunk.div_(world)
        # our matrices stacked, then zero padding up to the chunk size for the gather
        padding = [torch.zeros_like(params[0])] * (chunk - (hi - lo)) if chunk > hi - lo else []
        owned = torch.stack(params[lo:hi] + padding)
        if hi > lo:
            state = self.state[params[0]]  # the state of the whole chunk lives with the first param
            if not state:
                m, n = params[0].shape
                state["momentum_buffer"] = torch.zeros_like(owned[: hi - lo])
                state["second_momentum_buffer"] = owned.new_zeros((hi - lo, m, 1) if m >= n else (hi - lo, 1, n))
            self._lr_t.fill_(group["lr"])
            self._momentum_t.fill_(group["momentum"])
            self._wd_t.fill_(group["weight_decay"])
            self._beta2_t.fill_(group["beta2"])
            muon_update(owned[: hi - lo], grad_chunk[: hi - lo], state["momentum_buffer"],
                        state["second_momentum_buffer"], self._momentum_t, self._lr_t, self._wd_t, self._beta2_t,
                        self._norm_t, self._eq_t, self._plus_t, group["ns_steps"], self.muon_dtype)
        if world == 1:
            torch._foreach_copy_(params, list(owned.unbind(0)))
            return []
        # the padded gradient stack has exactly the gathered shape, and is free now
        return [(_all_gather(gather_buf, owned, async_op=True), params, gather_buf)]


def _grad_of(p):
    if p.grad is None:
        raise RuntimeError(f"parameter of shape {tuple(p.shape)} has no gradient; every parameter given to "
                           f"MuonAdamW must take part in the loss (ranks would otherwise fall out of step)")
    return p.grad
