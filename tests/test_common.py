"""Peak-FLOPs lookup on real device names, the compute dtype choice, the out-of-memory hint."""

import pytest
import torch

from picochat.common import PicochatError, detect_compute_dtype, get_peak_flops, out_of_memory_hint

# Names as torch.cuda.get_device_name / rocm report them.
PEAKS = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 836e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H800", 989e12),  # the SXM part: the reference table gave it the PCIe figure
    ("NVIDIA H800 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A800-SXM4-80GB", 312e12),
    ("NVIDIA A40", 149.7e12),
    ("NVIDIA A30", 165e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181.05e12),  # substring matching gave L4's 121e12
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA GeForce RTX 5090", 209.5e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),
    ("AMD Instinct MI300X", 1.3074e15),
    ("AMD Instinct MI325X", 1.3074e15),
    ("AMD Instinct MI355X", 2.5e15),
    ("AMD Instinct MI250X", 383e12),
    # not in the table: unknown, so MFU is n/a (not 0, as an infinite peak made it)
    ("NVIDIA A10G", None),
    ("NVIDIA RTX A4000", None),  # substring matching gave the A40's 149.7e12
    ("NVIDIA RTX A6000", None),
    ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA H20", None),
    ("cpu", None),
    # a MIG slice has only part of the GPU's SMs: the whole GPU's peak would understate its MFU
    ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", None),
]


@pytest.mark.parametrize("name,flops", PEAKS)
def test_peak_flops_on_real_device_names(name, flops, monkeypatch):
    monkeypatch.delenv("PICOCHAT_PEAK_FLOPS", raising=False)
    assert get_peak_flops(name) == flops


def test_peak_flops_override(monkeypatch):
    monkeypatch.setenv("PICOCHAT_PEAK_FLOPS", "1.5e12")
    assert get_peak_flops("cpu") == get_peak_flops("NVIDIA H100 80GB HBM3") == 1.5e12
    for bad in ("fast", "0", "-1", "inf"):
        monkeypatch.setenv("PICOCHAT_PEAK_FLOPS", bad)
        with pytest.raises(PicochatError, match="PICOCHAT_PEAK_FLOPS=.* is not a positive number"):
            get_peak_flops("cpu")


@pytest.fixture
def cuda_capability(monkeypatch):
    """Pretend the CUDA device has a given compute capability."""
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)

    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


CUDA = torch.device("cuda", 0)  # only compared and passed along, never allocated on


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_cuda_ampere_and_newer_compute_in_bf16(cuda_capability, capability):
    cuda_capability(*capability)
    dtype, reason = detect_compute_dtype(CUDA)
    assert dtype == torch.bfloat16
    assert f"SM{capability[0]}{capability[1]}" in reason


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (6, 1)])
def test_older_cuda_computes_in_fp32(cuda_capability, capability):
    cuda_capability(*capability)  # spec §5.4: fp32 on CUDA below SM80 (fp16 only by request)
    dtype, reason = detect_compute_dtype(CUDA)
    assert dtype == torch.float32
    assert f"SM{capability[0]}{capability[1]}" in reason


def test_cpu_computes_in_fp32(monkeypatch):
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)
    assert detect_compute_dtype(torch.device("cpu"))[0] == torch.float32


@pytest.mark.parametrize("value,dtype", [("float16", torch.float16), ("fp16", torch.float16),
                                         ("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_dtype_override_wins_over_the_hardware(cuda_capability, monkeypatch, value, dtype):
    cuda_capability(9, 0)
    monkeypatch.setenv("PICOCHAT_DTYPE", value)
    assert detect_compute_dtype(CUDA) == (dtype, f"PICOCHAT_DTYPE={value}")
    assert detect_compute_dtype(torch.device("cpu"))[0] == dtype


def test_bad_dtype_override_is_a_user_error(cuda_capability, monkeypatch):
    cuda_capability(9, 0)
    monkeypatch.setenv("PICOCHAT_DTYPE", "float8")
    with pytest.raises(PicochatError, match="PICOCHAT_DTYPE='float8'"):
        detect_compute_dtype(CUDA)


def test_out_of_memory_hint_names_the_flag():
    def oom():
        with out_of_memory_hint("--device-batch-size", 16, "in a training step"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(PicochatError, match=r"out of memory in a training step at --device-batch-size 16: try a "
                                            r"smaller --device-batch-size \(e.g. 8\)"):
        oom()
    with pytest.raises(PicochatError, match="even at 1: use a smaller --depth"):
        with out_of_memory_hint("--device-batch-size", 1, "in validation"):
            raise torch.OutOfMemoryError()
    with pytest.raises(ValueError):  # anything else passes through untouched
        with out_of_memory_hint("--device-batch-size", 4, "in validation"):
            raise ValueError("not memory")
