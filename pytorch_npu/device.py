"""Device, chip and dtype selection for NPU (torch-npu), CUDA and CPU.

torch_npu is imported lazily and only once: on a machine without CANN the import fails (libhccl.so missing), and
with torch >= 2.5 a broken torch-npu install can even make `import torch` fail, so nothing here imports it at module
level. The chip ("910b", "310p", ...) matters as much as the device type: 310P has no bf16 and lacks several fused
kernels, so the dtype policy and the kernel choice in `ops.py` are keyed by chip.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import torch

from telechat_ascend.device import parse_device
from telechat_ascend.errors import TeleChatError

# Chips with a policy. 910b = Atlas A2, a3 = Atlas A3, 910a = the older Atlas training series, 310p = Atlas 300I
# Pro / Duo inference cards; "unknown" is any other SoC torch_npu reports.
NPU_CHIPS = ("910a", "910b", "a3", "950", "310p", "unknown")
_CHIP_ALIASES = {"a2": "910b", "910": "910a"}

# SocVersion ids from torch_npu's NpuVariables.h (inclusive ranges).
_SOC_RANGES = ((100, 104, "910a"), (200, 205, "310p"), (220, 225, "910b"), (250, 259, "a3"), (260, 260, "950"))

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.cache
def _probe_torch_npu():
    # ImportError: not installed or libhccl.so missing; OSError: a broken shared library; RuntimeError: torch's
    # backend autoload or "Two accelerators cannot be used at the same time".
    try:
        import torch_npu
    except (ImportError, OSError, RuntimeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return torch_npu, None


def load_torch_npu():
    """The torch_npu module, or None when it cannot be imported (see `torch_npu_error`)."""
    return _probe_torch_npu()[0]


def torch_npu_error() -> str | None:
    """Why `import torch_npu` failed, or None when it worked."""
    return _probe_torch_npu()[1]


def _require_torch_npu():
    torch_npu = load_torch_npu()
    if torch_npu is None:
        version = torch.__version__.split("+")[0]
        raise TeleChatError(
            f"device npu needs torch-npu and the Ascend CANN runtime, but they could not be loaded "
            f"({torch_npu_error()}). Source CANN's environment first (e.g. `source "
            f"/usr/local/Ascend/ascend-toolkit/set_env.sh`) and install the torch-npu release matching torch "
            f"{version} (`pip install torch-npu=={version}`), or use the cpu or cuda device."
        )
    return torch_npu


def _auto_kind() -> str:
    torch_npu = load_torch_npu()
    if torch_npu is not None and torch_npu.npu.device_count() > 0:
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_index(kind: str, index: int, count: int, env: Mapping[str, str], spec: str) -> None:
    visible = "ASCEND_RT_VISIBLE_DEVICES" if kind == "npu" else "CUDA_VISIBLE_DEVICES"
    shown = f"{visible}={env.get(visible, '<unset>')}"
    if count == 0:
        raise TeleChatError(f"device {spec} requested but no {kind.upper()} is visible ({shown}): check the driver")
    if index >= count:
        source = f" (from LOCAL_RANK={env['LOCAL_RANK']})" if ":" not in spec and "LOCAL_RANK" in env else ""
        raise TeleChatError(
            f"{kind}:{index}{source} requested but only {count} {kind.upper()} device(s) are visible ({shown}); "
            f"launch at most {count} processes per node or fix {visible}"
        )


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn "npu", "npu:N", "cuda", "cuda:N", "cpu" or "auto" into a device and make it the current one.

    "auto" picks npu when torch_npu loads and sees a device, else cuda when available, else cpu.
    """
    env = os.environ
    kind, index = parse_device(spec, env)
    if kind == "auto":
        kind, index = parse_device(_auto_kind(), env)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        torch_npu = _require_torch_npu()
        _check_index("npu", index, torch_npu.npu.device_count(), env, spec)
        torch_npu.npu.set_device(index)
    else:
        if not torch.cuda.is_available():
            raise TeleChatError(
                f"device {spec} requested but CUDA is not available (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
            )
        _check_index("cuda", index, torch.cuda.device_count(), env, spec)
        torch.cuda.set_device(index)
    return torch.device(kind, index)


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for a device: hccl (npu), nccl (cuda) or gloo (cpu)."""
    # A string is split by hand: torch.device("npu") itself fails until torch_npu is imported.
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    backends = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
    if kind not in backends:
        raise TeleChatError(f"no distributed backend for device {device!r}: expected npu, cuda or cpu")
    return backends[kind]


def chip_from_soc_version(version: int) -> str:
    """Chip family for a `torch_npu._C._npu_get_soc_version()` id."""
    return next((chip for low, high, chip in _SOC_RANGES if low <= version <= high), "unknown")


def chip_from_name(name: str) -> str:
    """Chip family for a SoC name such as "Ascend910B2" or "Ascend310P3" (torch_npu.npu.get_device_name())."""
    name = name.strip().lower().replace("ascend", "", 1)
    if re.fullmatch(r"310p\d*", name):
        return "310p"
    # "Ascend910B" without a digit is the old 910 (id 104); the A2 parts are 910B1-B4, 910B2C, 910B4-1.
    if re.fullmatch(r"910b\d.*", name):
        return "910b"
    if name in ("910premiuma", "910proa", "910a", "910prob", "910b"):
        return "910a"
    if re.fullmatch(r"910_93\d+|910c\d", name):
        return "a3"
    if name.startswith("950"):
        return "950"
    return "unknown"


def normalize_chip(chip: str) -> str:
    """Accept a chip family ("310p", "910b", "a2", "a3", "cpu", "cuda", ...) or a SoC name ("Ascend310P3")."""
    key = chip.strip().lower()
    key = _CHIP_ALIASES.get(key, key)
    if key in NPU_CHIPS or key in ("cpu", "cuda"):
        return key
    family = chip_from_name(chip)
    if family == "unknown":
        raise TeleChatError(f"unknown chip {chip!r}: expected one of {', '.join(NPU_CHIPS[:-1])}, a2, cpu or cuda")
    return family


def soc_name() -> str:
    """The raw SoC name of the current NPU, e.g. "Ascend910B2" (for logs)."""
    return _require_torch_npu().npu.get_device_name()


@functools.cache
def npu_chip() -> str:
    """Chip family of the current NPU: from its SoC name, else from the SoC id."""
    chip = chip_from_name(soc_name())
    if chip == "unknown":
        chip = chip_from_soc_version(_require_torch_npu()._C._npu_get_soc_version())
    return chip


@functools.cache
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor string of this machine's CPU ("GenuineIntel", "AuthenticAMD", "HygonGenuine", ...), or "" where
    /proc/cpuinfo does not say (other systems, other architectures)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            match = re.search(r"^vendor_id\s*:\s*(\S+)", f.read(), re.MULTILINE)
    except OSError:
        return ""
    return match.group(1) if match else ""


def detect_chip(device: torch.device | str) -> str:
    """"cpu", "cuda" or the NPU chip family for a device."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return npu_chip() if kind == "npu" else kind


def _dtype_policy(chip: str) -> tuple[torch.dtype, tuple[torch.dtype, ...], str]:
    """(default, allowed, reason shown when a dtype is refused) for a chip."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if chip == "310p":
        return fp16, (fp16,), (
            "Atlas 300I (310P) runs fp16 only: it has no bf16 (torch_npu enables bf16 from Ascend910B1 on), and fp32 "
            "is refused because 310P is an inference card whose fused attention kernels take fp16 only and whose "
            "cube units run fp32 matmuls at a fraction of the fp16 rate with twice the memory"
        )
    if chip in ("910b", "a3", "950"):
        return bf16, (bf16, fp16, fp32), ""
    if chip == "cuda":
        if torch.cuda.is_bf16_supported():
            return bf16, (bf16, fp16, fp32), ""
        return fp16, (fp16, fp32), "this GPU does not support bf16; use fp16 or fp32"
    if chip == "cpu":
        return fp32, (fp32, bf16), (
            "fp16 on CPU is refused: CPU fp16 matmuls are slow or unsupported in training (DeepSpeed rejects fp16 on "
            "CPU); use fp32 or bf16"
        )
    # 910a and unrecognized SoCs: torch_npu enables bf16 only from Ascend910B1 (SoC id 220) on.
    name = "this unrecognized NPU" if chip == "unknown" else f"Ascend {chip}"
    return fp16, (fp16, fp32), f"{name} has no bf16 in torch_npu (enabled from Ascend910B1 on); use fp16 or fp32"


def resolve_dtype(device: torch.device | str, requested: str | None, chip: str | None = None) -> torch.dtype:
    """The compute dtype for a device: the chip's default when `requested` is None, else the requested one if the
    chip supports it. `chip` overrides detection (e.g. "310p" to exercise the 310P policy on CPU)."""
    chip = normalize_chip(chip) if chip is not None else detect_chip(device)
    default, allowed, reason = _dtype_policy(chip)
    if requested is None:
        return default
    dtype = _DTYPE_NAMES.get(requested.strip().lower())
    if dtype is None:
        raise TeleChatError(f"unknown dtype {requested!r}: expected one of {', '.join(_DTYPE_NAMES)}")
    if dtype not in allowed:
        names = ", ".join(_SHORT[d] for d in allowed)
        raise TeleChatError(f"dtype {requested} is not supported on {chip} (allowed: {names}): {reason}")
    return dtype
