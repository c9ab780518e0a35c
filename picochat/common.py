"""Runtime plumbing shared by every stage: where files live, which device and
dtype we compute in, torch.distributed setup, and user-facing errors."""

import contextlib
import math
import os
import platform
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class PicochatError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one
    line (no traceback) and exits with status 1."""


# ---------------------------------------------------------------------------
# Files


def get_base_dir() -> Path:
    """Everything a run produces lives here: $PICOCHAT_HOME or ~/.cache/picochat."""
    home = os.environ.get("PICOCHAT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "picochat")
    path = Path(home)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_url(location: str) -> bool:
    return urllib.parse.urlparse(str(location)).scheme in ("http", "https")


# ---------------------------------------------------------------------------
# Distributed


def dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else dist_info()[1]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else dist_info()[3]


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------
# Device and dtype (detected once, in compute_init)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def detect_compute_dtype(device: torch.device):
    """(dtype, reason). bf16 where the hardware has fast bf16 matmuls (CUDA SM>=80),
    fp32 elsewhere; PICOCHAT_DTYPE overrides. Master weights stay fp32 regardless."""
    override = os.environ.get("PICOCHAT_DTYPE")
    if override:
        if override not in _DTYPES:
            raise PicochatError(f"PICOCHAT_DTYPE={override!r} is not one of bfloat16, float16, float32")
        return _DTYPES[override], f"PICOCHAT_DTYPE={override}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"CUDA SM{major}{minor} supports bf16"
        return torch.float32, f"CUDA SM{major}{minor} has no fast bf16"
    return torch.float32, f"{device.type} default"


@dataclass
class Runtime:
    """What compute_init decided; passed explicitly to whatever needs it."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str

    @property
    def master(self) -> bool:
        return self.rank == 0


def compute_init(device_type: str = "", seed: int = 42) -> Runtime:
    """Pick the device, seed every rank identically (all ranks then build identical
    weights without a broadcast) and join the process group when run by torchrun."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise PicochatError("--device-type cuda was requested but CUDA is not available")
    if device_type not in ("cuda", "mps", "cpu"):
        raise PicochatError(f"unknown device type {device_type!r} (choose cuda, mps or cpu)")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul
    ddp, rank, local_rank, world_size = dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        dist.barrier()
    dtype, reason = detect_compute_dtype(device)
    return Runtime(ddp and world_size > 1, rank, local_rank, world_size, device, dtype, reason)


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------
# Peak dense bf16 FLOP/s, for MFU: the reference's table (section 9.4) checked against the vendors'
# datasheets, which quote bf16 "with sparsity" at twice the dense figure. First matching pattern
# wins, so variants (NVL, PCIe) come before the bare name. Patterns match whole words of the
# device name: as plain substrings "l4" would match "NVIDIA L40S", "a40" "NVIDIA RTX A4000".
# MIG slices ("NVIDIA H100 80GB HBM3 MIG 3g.40gb") get no entry: see get_peak_flops.

PEAK_FLOPS = [
    (r"gb200|grace blackwell", 2.5e15),  # NVIDIA GB200 NVL72 datasheet, per GPU
    (r"b200", 2.25e15),  # NVIDIA HGX B200 datasheet, per GPU
    (r"b100", 1.8e15),  # NVIDIA Blackwell architecture brief, HGX B100 per GPU
    (r"gh200", 989e12),  # GH200 datasheet: the H100 SXM's tensor cores (the reference's "h200" matched it)
    (r"h200.*(nvl|pcie)", 836e12),  # H200 datasheet, H200 NVL (PCIe card) 1,671 TF sparse
    (r"h200", 989e12),  # H200 datasheet, H200 SXM 1,979 TF sparse
    (r"h100.*nvl", 835e12),  # H100 datasheet, H100 NVL 1,671 TF sparse
    (r"h100.*pcie", 756e12),  # H100 datasheet, H100 PCIe 1,513 TF sparse
    (r"h100", 989e12),  # H100 datasheet, H100 SXM 1,979 TF sparse
    # H800 datasheet: the SXM part ("NVIDIA H800") has the H100 SXM's 1,979 TF sparse and the PCIe
    # card ("NVIDIA H800 PCIe") 1,513 TF. The reference gives the bare name the PCIe figure and
    # the SXM figure to "h800+nvl", a name no H800 has.
    (r"h800.*pcie", 756e12),
    (r"h800", 989e12),
    (r"a100|a800", 312e12),  # A100 datasheet, 312 TF dense (SXM and PCIe alike); A800 the same die
    (r"a40", 149.7e12),  # A40 datasheet, 299.4 TF sparse
    (r"a30", 165e12),  # A30 datasheet, 330 TF sparse
    (r"l40s|l40-s", 362e12),  # L40S datasheet, 733 TF sparse (362.05 dense); "NVIDIA L40S"
    (r"l40", 181.05e12),  # L40 datasheet, 362.1 TF sparse; not in the reference table (its "l4" matched L40)
    (r"l4", 121e12),  # L4 datasheet, 242 TF sparse
    (r"mi355x?", 2.5e15),  # AMD Instinct MI355X spec sheet, dense bf16
    (r"mi325x?|mi300x", 1.3074e15),  # AMD MI300X / MI325X spec sheets, 1,307.4 TF dense
    (r"mi300a", 980.6e12),  # AMD MI300A spec sheet
    (r"mi250x", 383e12),  # AMD MI250X spec sheet
    (r"mi250", 362.1e12),  # AMD MI250 spec sheet
    (r"5090", 209.5e12),  # RTX Blackwell whitepaper, RTX 5090 bf16 dense with fp32 accumulate
    (r"4090", 165.2e12),  # Ada whitepaper, RTX 4090 bf16 dense with fp32 accumulate
    (r"3090", 71e12),  # Ampere GA102 whitepaper, RTX 3090 bf16 dense with fp32 accumulate
]


def get_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device: $PICOCHAT_PEAK_FLOPS when set (for a device the table
    lacks), else the table's entry; None when unknown (MFU is then n/a, not 0)."""
    override = os.environ.get("PICOCHAT_PEAK_FLOPS")
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if not value > 0 or math.isinf(value):
            raise PicochatError(f"PICOCHAT_PEAK_FLOPS={override!r} is not a positive number of FLOP/s (e.g. 989e12)")
        return value
    name = device_name.lower()
    if " mig " in f" {name} ":
        # a MIG slice has a fraction of the GPU's SMs that its name does not give exactly
        return None
    for pattern, flops in PEAK_FLOPS:
        if re.search(rf"\b(?:{pattern})\b", name):
            return flops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def git_commit() -> str:
    """picochat's own commit (+dirty for uncommitted changes), where it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """Where a run ran, for its checkpoint meta (and so the report)."""
    return {"picochat commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "CUDA": torch.version.cuda or "none", "platform": platform.platform(),
            "device": device_name(device), "CPU cores": os.cpu_count()}



@contextlib.contextmanager
def out_of_memory_hint(flag: str, value: int, what: str, note: str = ""):
    """Turn an out-of-memory error inside the block into one line that names the flag to lower
    (a CUDA OOM traceback names none). what: the work that ran out, e.g. "in a training step";
    note: why lowering the flag is safe, if it needs saying."""
    try:
        yield
    except torch.OutOfMemoryError:
        if value > 1:
            advice = f"try a smaller {flag} (e.g. {value // 2}{'; ' + note if note else ''})"
        else:
            advice = "it does not fit even at 1: use a smaller --depth or shorter sequences"
        raise PicochatError(f"out of memory {what} at {flag} {value}: {advice}") from None
