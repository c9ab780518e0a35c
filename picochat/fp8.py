"""FP8 training of the big matmuls (base-train --fp8): tensorwise dynamic scaling.

Each of a Linear's three GEMMs (the forward, and the input and weight gradients of the backward)
runs in fp8 through torch._scaled_mm. Before each, every operand gets one scale for the whole
tensor, fp8_max / amax, so that its largest value lands on the format's largest finite value;
the product is rescaled by the inverse scales inside the GEMM. Inputs and weights use e4m3 (more
mantissa), the output gradients e5m2 (more range). The forward accumulates with fast (reduced
precision) accumulation, the backward without, as the reference does.

Only matrices big enough to gain are converted: both sides divisible by 16 (what the fp8 GEMM
needs) and the smaller at least 128, so the attention and MLP matrices and lm_head; the small
gates stay in the compute dtype. A converted layer is a gpt.Linear subclass sharing the same
weight Parameter, so the optimizer, checkpoints and the FLOPs count (num_matmul_params, which
the reference's fp8 forgot) see no difference. Evaluations run with fp8 off (`disabled`): val
bpb, CORE and samples measure the model in the compute dtype.

torch._scaled_mm runs on GPUs of compute capability 8.9+ (H100, L4, RTX 40xx); the CPU computes
the same products from the dequantized operands (scaled_mm), so the tests run this very code. On
the GPU the second operand must be column-major, which is why the backward transposes copies
into that layout.
"""

import contextlib

import torch
import torch.nn as nn

from picochat.common import PicochatError
from picochat.gpt import Linear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_SIDE = 128  # smaller matrices lose more to the scaling than the fp8 GEMM gains


def to_fp8(x: torch.Tensor, dtype: torch.dtype):
    """(x scaled into dtype's range and cast to it, row-major whatever x's strides, as the GEMM
    wants it; the inverse scale as a 0-d fp32 tensor): x ~= x_fp8 * inv_scale. The scale is
    computed in fp64, as torchao and the reference do, so the eager and compiled paths round it
    alike. The clamp matters: casting to e4m3fn does not saturate."""
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().abs().max().double().clamp(min=1e-12)
    scale = (fp8_max / amax).float()
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype).contiguous(), scale.reciprocal()


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column (what _scaled_mm's second operand must be on a GPU)."""
    return x.t().contiguous().t()


def scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum: bool):
    """(a * scale_a) @ (b * scale_b) from fp8 a and b: torch._scaled_mm on a GPU. On the CPU, the
    same product of the dequantized operands in fp32: torch's CPU kernel computes it too, but some
    500x slower than a float matmul (tests/test_fp8.py checks that the two agree)."""
    if a.device.type == "cuda":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                use_fast_accum=use_fast_accum)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """x (N, in) @ weight (out, in).T with all three GEMMs in fp8; returns the compute dtype of x."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w8 is (out, in) row-major, so w8.t() is (in, out) column-major, as needed
        return scaled_mm(x8, w8.t(), x_inv, w_inv, x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad, E5M2)
        grad_x = scaled_mm(g8, column_major(w8), g_inv, w_inv, grad.dtype, use_fast_accum=False)
        grad_w = scaled_mm(g8.t().contiguous(), column_major(x8), g_inv, x_inv, ctx.weight_dtype, use_fast_accum=False)
        return grad_x, grad_w


class Float8Linear(Linear):
    """A gpt.Linear whose matmul runs in fp8 while `fp8` is True (see `disabled`)."""

    fp8 = True

    def forward(self, x):
        if not self.fp8:
            return super().forward(x)
        out = _Fp8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear: Linear) -> "Float8Linear":
        with torch.device("meta"):  # no second weight in memory: the real one is shared below
            new = cls(linear.in_features, linear.out_features)
        new.weight = linear.weight
        return new


def eligible(module: nn.Module) -> bool:
    return (type(module) is Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= MIN_SIDE)


def convert(model: nn.Module) -> list[str]:
    """Swap every eligible Linear of the model for a Float8Linear sharing its weight (before
    torch.compile, and before the optimizer is built or not: the Parameters stay the same);
    returns the converted modules' names."""
    converted = []
    for name, module in list(model.named_modules()):
        if eligible(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Float8Linear.from_linear(module))
            converted.append(name)
    return converted


@contextlib.contextmanager
def disabled(model: nn.Module):
    """The model's Float8Linear layers compute in the compute dtype inside the block (a compiled
    model recompiles once for this state and keeps both graphs)."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    saved = [m.fp8 for m in layers]
    for m in layers:
        m.fp8 = False
    try:
        yield
    finally:
        for m, state in zip(layers, saved):
            m.fp8 = state


def check_supported(device: torch.device):
    """A one-line error where torch._scaled_mm cannot run."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise PicochatError(f"--fp8 needs a GPU of compute capability 8.9 or higher (H100, L4, RTX 40xx); "
                                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    elif device.type != "cpu":
        raise PicochatError(f"--fp8 runs on CUDA GPUs (and on the CPU, for testing), not on {device.type}")
