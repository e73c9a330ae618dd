"""Int8 linear layers for TeleChat: W8A16 and W8A8 on real int8 kernels, and the hook that builds them at load time.

Format (one Int8Linear replaces one nn.Linear, same state-dict prefix):
    weight        int8 [N, K]  the nn.Linear layout, symmetric (no zero point): W ≈ weight · weight_scale
    weight_scale  fp16 [N]     one scale per output row, or [N, K / group_size] per group of consecutive inputs
    input_scale   fp32 []      w8a8 only: static per-tensor activation scale (310P has no per-token scales)
    bias          float [N]    dense and down_proj only, kept in float

Per-row scales make the fused key_value projection safe without de-interleaving its rows: every row ([K_0; V_0;
K_1; V_1; ...]) carries its own scale, so the per-head interleave never mixes rows under one scale. Groups run
along K (the input dimension) only, for the same reason.

Kernels, by device and chip (`int8_kernel`):

| method         | 910b, a3                     | 310p                                | cpu, ≤ 16 rows              | cpu, more rows |
|----------------|------------------------------|-------------------------------------|-----------------------------|----------------|
| w8a16          | npu_weight_quant_batchmatmul | same, fp16, per channel only        | _weight_int8pack_mm         | dequant_bf16   |
| w8a16, groups  | same, antiquant_group_size   | refused (telechat_ascend.chips)     | 2 × int4 kernel (below)     | dequant_bf16   |
| w8a8           | npu_quant_matmul             | same, weight cast to NZ, int32 bias | _weight_int8pack_mm         | int_mm         |
| w4a16 (GPTQ)   | same, int4 packed 8 per int32| refused (no int4 matmul)            | _weight_int4pack_mm_for_cpu | dequant_bf16   |

Other devices, and CPU calls a kernel's rules exclude, take "dequant" (fp32). The CPU int8 kernel needs K % 8 = 0;
the int4 one groups of 32-256 and N % 16 = 0. torch's CPU int8-weight kernel takes one scale per row only, so
grouped int8 (GPTQ 8-bit) runs as two grouped int4 matmuls over the high and low nibbles of each code
(`_int4_halves`).

Decode (a few rows) is bound by reading the weights: `_weight_int8pack_mm` reads int8 and is vectorized for bf16
activations only (fp32 and fp16 take a scalar loop several times slower than an fp32 matmul), so these calls run in
bf16 and come back in the caller's dtype. W8A8 feeds it the activations already rounded to the int8 grid (integers
are exact in bf16) and applies the activation scale afterwards: the result is the int8 × int8 product.

Prefill is bound by arithmetic, where that kernel is hopeless (one row at a time: 30x slower than fp32 at 100 rows,
measured). W8A8 runs `torch._int_mm` (oneDNN's int8 GEMM, int32 accumulation: exact) where the CPU has int8 dot
products (AVX-512 VNNI, AMX); without them oneDNN saturates int16 or loops (measured 3-20x slower than fp32 on an
AVX2 CPU). Weight-only layers rebuild this one layer's weight for the call (never the whole model) in a per-thread
workspace and run a float GEMM: bf16 ("dequant_bf16", like the decode kernel) where the CPU has bf16 dot products
(AVX-512 BF16, AMX), else fp32 ("dequant", which for w8a8 multiplies the integer activations and weights exactly as
the int8 GEMM would, up to fp32 accumulation). The workspace is reused because a fresh 100 MB tensor costs as much in
first-touch page faults as filling it (measured: int8 -> bf16 into a new tensor 39 ms, into a reused one 8 ms).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from telechat_ascend.chips import check_quantization_for_chip
from telechat_ascend.errors import TeleChatError
from telechat_ascend.weights import LM_HEAD, LM_HEAD_MODULE, some_names

from . import ops
from .device import load_torch_npu, normalize_chip, npu_chip

METHODS = ("w8a16", "w8a8", "w4a16")  # the in-memory formats; w4a16 comes from 4-bit GPTQ folders
LINEARS = ("query", "key_value", "dense", "gate_proj", "up_proj", "down_proj")  # of each block; lm_head: see `lm_head`
QMAX = 127  # symmetric int8: -128 is never used, so negation stays exact
CPU_DECODE_ROWS = 16  # at most this many rows per call take the CPU int8 kernel; more are prefill (see above)
# The CPU's dot-product instructions, which decide the prefill kernels (module docstring).
CPU_INT8_DOT = torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()
CPU_BF16_DOT = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
ACL_FORMAT_FRACTAL_NZ = 29
KERNEL_ALIGNMENT = 64  # bytes: torch's CPU allocator gives this, and AVX-512 kernels load whole 64-byte lines


def check_quantization(quantization: dict) -> tuple[str, int, list[str], bool]:
    """(method, group_size, float_modules, lm_head) of a config.json `quantization` section, validated."""
    if not isinstance(quantization, dict):
        raise TeleChatError(f"config field 'quantization' must be an object, got {quantization!r}")
    method = quantization.get("method")
    if method not in METHODS:
        raise TeleChatError(f"unknown quantization method {method!r}: expected one of {', '.join(METHODS)}")
    group_size = quantization.get("group_size", 0)
    if type(group_size) is not int or group_size < 0 or (group_size and group_size % 32):
        raise TeleChatError(f"quantization group_size must be 0 (per channel) or a positive multiple of 32 (the NPU "
                            f"kernel's rule), got {group_size!r}")
    if group_size and method == "w8a8":
        raise TeleChatError("w8a8 takes per-channel weight scales only: npu_quant_matmul has no weight groups")
    if not group_size and method == "w4a16":
        raise TeleChatError("w4a16 takes per-group weight scales only (group_size > 0)")
    keep = quantization.get("float_modules", [])
    if not isinstance(keep, list) or not all(isinstance(name, str) for name in keep):
        raise TeleChatError(f"quantization float_modules must be a list of module names, got {keep!r}")
    lm_head = quantization.get("lm_head", False)
    if type(lm_head) is not bool:
        raise TeleChatError(f"quantization lm_head must be true or false, got {lm_head!r}")
    if lm_head and method == "w8a8":
        raise TeleChatError("quantization lm_head: w8a8 keeps the head float (its activation scales are calibrated "
                            "for the block linears only)")
    return method, group_size, keep, lm_head


# --- quantization math ---------------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp16 scale [N] or [N, K / group_size]): symmetric absmax per output row or per group along K.

    The scale is rounded to fp16 before dividing, so int8 · stored scale is the nearest grid point to the weight."""
    n, k = weight.shape
    if group_size and k % group_size:
        raise TeleChatError(f"group size {group_size} does not divide the input dimension {k}")
    w = weight.detach().float().reshape(n, -1, group_size or k)
    scale = (w.abs().amax(-1) / QMAX).clamp(min=torch.finfo(torch.float16).tiny).half()
    q = torch.round(w / scale.float()[..., None]).clamp(-QMAX, QMAX).to(torch.int8).reshape(n, k)
    return q, scale if group_size else scale[:, 0]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] = q · scale, the scale broadcast over its row or group."""
    n, k = q.shape
    groups = scale.float().reshape(n, -1)
    return (q.reshape(n, groups.shape[1], -1) * groups[..., None]).reshape(n, k)  # int8 · fp32 gives fp32


def round_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded and clamped to the int8 grid, as fp32 integers."""
    return (x.float() / scale.float()).round_().clamp_(-QMAX, QMAX)


# --- kernels -------------------------------------------------------------------------------------------------------

def kernel_friendly(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` itself if it is contiguous and starts on a KERNEL_ALIGNMENT boundary, else an owned contiguous copy.

    `_weight_int8pack_mm` crashes (SIGSEGV) on AVX-512 CPUs when its int8 weight does not start on a 16-byte
    boundary, and a tensor memory-mapped from a safetensors file starts wherever the header length puts it. A fresh
    allocation is aligned, and owning it also means no kernel ever reads a file mapping that may change under it."""
    if t is None or t.device.type == "meta" or (t.is_contiguous() and t.data_ptr() % KERNEL_ALIGNMENT == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _device_type(x: torch.Tensor) -> str:
    # The one place the device is read, so the tests can drive the NPU branches on CPU with a fake torch_npu.
    return x.device.type


def int8_kernel(device_type: str, chip: str, method: str, rows: int, in_features: int, group_size: int,
                out_features: int = 16) -> str:
    """Which implementation an Int8Linear or Int4Linear call runs (see the module docstring)."""
    if device_type == "npu":
        check_quantization_for_chip(chip, method, group_size)
        return "npu_quant_matmul" if method == "w8a8" else "npu_weight_quant_batchmatmul"
    if device_type != "cpu":
        return "dequant"
    if rows > CPU_DECODE_ROWS:
        if method == "w8a8":
            return "int_mm" if CPU_INT8_DOT else "dequant"
        return "dequant_bf16" if CPU_BF16_DOT else "dequant"
    if method == "w4a16" or group_size:  # the CPU int4 kernel's rules: whole groups of 32..256, N % 16 == 0
        fits = group_size in (32, 64, 128, 256) and in_features % group_size == 0 and out_features % 16 == 0
        return "int4pack_mm" if fits else "dequant"
    # The CPU int8 kernel loads bf16 rows with aligned 16-byte loads: K must be a multiple of 8.
    return "int8pack_mm" if in_features % 8 == 0 else "dequant"


def _npu_weight_quant_batchmatmul_args(x, weight, scale, bias, group_size):
    # x (M, K) fp16/bf16; the weight's logical (K, N) is the transposed view of [N, K] (the layout the docs recommend
    # per channel); the scale is (N,) per channel or (K / group, N) per group, in x's dtype.
    kwargs = {"bias": bias, "antiquant_group_size": group_size}
    return (x, weight.t(), scale.t() if group_size else scale), kwargs


def _npu_quant_matmul_args(x_int8, weight, scale, bias, output_dtype):
    # weight: [N, K] int8 (NZ on 310P), passed as its transposed view (K, N); scale fp32 (N,) (fp16 is rejected);
    # bias int32 in accumulator units, the one bias dtype every chip takes.
    return (x_int8, weight.t(), scale), {"bias": bias, "output_dtype": output_dtype}


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights: y = x · (weight ⊙ weight_scale)ᵀ + bias, and for w8a8 x first rounded to the
    int8 grid of input_scale. Inference only: the state is buffers."""

    WEIGHT_DTYPE, FORMAT = torch.int8, "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str, group_size: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        self.chip: str | None = None  # None: the chip of the device the call runs on
        scale_shape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float16))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32) if method == "w8a8" else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_operands = None  # (key, operands): see _operands

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str, group_size: int = 0,
                   input_scale: float | None = None) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, method, group_size)
        module.weight, module.weight_scale = quantize_weight(linear.weight, group_size)
        if method == "w8a8":
            module.input_scale = torch.tensor(input_scale, dtype=torch.float32)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module.to(linear.weight.device)

    def check_state(self, name: str, source) -> None:
        """The loaded state as the format defines it (module docstring): int8 weights, positive finite fp16 weight
        scales and fp32 activation scale. A NaN, zero or negative scale would run and give garbage."""
        expected = {"weight": self.WEIGHT_DTYPE, "weight_scale": torch.float16, "input_scale": torch.float32}
        for buffer, dtype in expected.items():
            tensor = getattr(self, buffer)
            if tensor is None:
                continue
            where = f"{source}: tensor {name}.{buffer}"
            if tensor.dtype != dtype:
                stored = str(tensor.dtype).removeprefix("torch.")
                raise TeleChatError(f"{where} is {stored}, the {self.FORMAT} format stores "
                                    f"{str(dtype).removeprefix('torch.')}")
            if buffer != "weight":
                bad = ~(torch.isfinite(tensor.float()) & (tensor.float() > 0))
                if bad.any():
                    value = tensor.float().flatten()[bad.flatten().nonzero()[0]].item()
                    raise TeleChatError(f"{where} holds {int(bad.sum())} value(s) that are not positive finite "
                                        f"numbers (e.g. {value}); the folder is damaged: quantize again")

    def extra_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        device_type = _device_type(x)
        chip = self.chip or (npu_chip() if device_type == "npu" else device_type)
        kernel = int8_kernel(device_type, chip, self.method, x2.shape[0], self.in_features, self.group_size,
                             self.out_features)
        if kernel == "npu_weight_quant_batchmatmul":
            y = self._npu_w8a16(x2, chip)
        elif kernel == "npu_quant_matmul":
            y = self._npu_w8a8(x2, chip)
        elif kernel in ("int8pack_mm", "int4pack_mm"):
            y = self._cpu_kernel(x2)
        elif kernel == "int_mm":
            y = self._int_mm(x2)
        else:
            y = self._dequant(x2, torch.bfloat16 if kernel == "dequant_bf16" else torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _activation(self, x2: torch.Tensor) -> torch.Tensor:
        return round_activation(x2, self.input_scale) if self.method == "w8a8" else x2

    def _row_scale(self) -> torch.Tensor:
        """fp32 [N]: the weight scale, times the activation scale for w8a8 (what multiplies the integer product)."""
        scale = self.weight_scale.float()
        return scale * self.input_scale.float() if self.method == "w8a8" else scale

    def _cpu_kernel(self, x2):
        # A fresh contiguous bf16 copy: the kernel's aligned loads crash on an offset view (e.g. hidden[:, -1:]).
        a = self._activation(x2).to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
        weight, scale, bias = self._operands("cpu", torch.bfloat16)
        if self.group_size:  # the two int4 halves of each code (see _int4_halves), each on the grouped int4 kernel
            y = sum(torch._weight_int4pack_mm_for_cpu(a, packed, self.group_size, scales_and_zeros).float()
                    for packed, scales_and_zeros in weight)
        else:
            y = torch._weight_int8pack_mm(a, weight, scale)
        return y if bias is None else y.float() + bias

    def _int_mm(self, x2):
        # int8 x int8 -> int32 (exact), then both scales; the weight's transposed view is the (K, N) operand.
        y = torch._int_mm(self._activation(x2).to(torch.int8), self.weight.t()) * self._row_scale()
        return y if self.bias is None else y + self.bias.float()

    def _dequant(self, x2, dtype):
        # Per-channel scales go on the output (x·(q·s)ᵀ = (x·qᵀ)·s): the workspace holds the integer codes.
        weight = self._weight_into(_workspace(self.out_features, self.in_features, dtype, x2.device))
        y = ops.linear(self._activation(x2).to(dtype), weight).float()
        if not self.group_size:
            y = y * self._row_scale()
        return y if self.bias is None else y + self.bias.float()

    def _weight_into(self, workspace: torch.Tensor) -> torch.Tensor:
        """The layer's weight in `workspace` ([N, K], float): codes, times the group scales if there are groups."""
        workspace.copy_(self.weight)
        return self._scale_groups(workspace)

    def _scale_groups(self, workspace: torch.Tensor) -> torch.Tensor:
        if self.group_size:
            n, k = workspace.shape
            workspace.view(n, -1, self.group_size).mul_(self.weight_scale.to(workspace.dtype)[..., None])
        return workspace

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_operands = None  # derived from the state being replaced in place
        super()._load_from_state_dict(*args, **kwargs)
        # transformers assigns the loaded tensors (assign=True): views into the memory-mapped file. The buffers are
        # made kernel-friendly here, once per load (see kernel_friendly), not on every call.
        for name, buffer in self._buffers.items():
            self._buffers[name] = kernel_friendly(buffer)

    def _operands(self, chip: str, dtype: torch.dtype):
        """The kernels' operands (weight, scale, bias), derived once instead of on every token; rebuilt when the
        module moves, a buffer is replaced, or the chip or activation dtype changes."""
        key = (self.weight.device, chip, dtype, tuple(t.data_ptr() for t in self.buffers()))
        if self._kernel_operands is None or self._kernel_operands[0] != key:
            if chip == "cpu":  # _weight_int8pack_mm: bf16 scales of the integer product
                bias = None if self.bias is None else self.bias.float()
                operands = (kernel_friendly(self.weight), self._row_scale().to(dtype), bias)
                if self.group_size:
                    operands = (_int4_halves(self.weight, self.weight_scale, dtype), None, bias)
            elif self.method == "w8a16":
                # 310P and fp16 x: fp16 bias; bf16 x (A2): fp32 bias. The scale is in x's dtype.
                bias = None if self.bias is None else self.bias.to(torch.float16 if dtype == torch.float16
                                                                   else torch.float32)
                operands = (self.weight, self.weight_scale.to(dtype), bias)
            else:
                scale = self._row_scale()
                bias = None if self.bias is None else torch.round(self.bias.float() / scale).to(torch.int32)
                weight = self.weight
                if chip == "310p":  # 310P takes the weight transposed and in the NZ layout only
                    weight = load_torch_npu().npu_format_cast(weight.contiguous(), ACL_FORMAT_FRACTAL_NZ)
                operands = (weight, scale, bias)
            self._kernel_operands = (key, operands)
        return self._kernel_operands[1]

    def _npu_w8a16(self, x2, chip):
        # The kernel takes fp16 or bf16 x; 310P fp16 only.
        dtype = x2.dtype if x2.dtype == torch.bfloat16 and chip != "310p" else torch.float16
        weight, scale, bias = self._operands(chip, dtype)
        args, kwargs = _npu_weight_quant_batchmatmul_args(x2.to(dtype), weight, scale, bias, self.group_size)
        return load_torch_npu().npu_weight_quant_batchmatmul(*args, **kwargs)

    def _npu_w8a8(self, x2, chip):
        dtype = x2.dtype if x2.dtype == torch.bfloat16 and chip != "310p" else torch.float16
        weight, scale, bias = self._operands(chip, dtype)
        x_int8 = round_activation(x2, self.input_scale).to(torch.int8)
        args, kwargs = _npu_quant_matmul_args(x_int8, weight, scale, bias, dtype)
        return load_torch_npu().npu_quant_matmul(*args, **kwargs)


class Int4Linear(Int8Linear):
    """w4a16 (from 4-bit GPTQ folders): y = x · (code ⊙ weight_scale)ᵀ + bias with signed 4-bit codes in [-8, 7]
    and one fp16 scale per (row, group of inputs). Buffers:
        weight        uint8 [N, K / 2]  two codes per byte, code + 8: column 2j in the low nibble, 2j + 1 high
        weight_scale  fp16  [N, K / group_size]
        bias          float [N]
    The CPU kernel is `_weight_int4pack_mm_for_cpu` (bf16 activations, its own tiled weight layout, derived once);
    the NPU one npu_weight_quant_batchmatmul on int4 codes packed eight to an int32 (A2/A3 only)."""

    WEIGHT_DTYPE, FORMAT = torch.uint8, "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str = "w4a16", group_size: int = 128):
        if in_features % 2 or not group_size:
            raise TeleChatError(f"int4 layers need an even input size and groups, got {in_features}, {group_size}")
        super().__init__(in_features, out_features, bias, "w8a16", group_size)
        self.method = "w4a16"
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
        """From signed codes int8 [N, K] in [-8, 7] and fp16 scales [N, K / group_size]."""
        n, k = codes.shape
        module = cls(k, n, bias is not None, group_size=k // scale.shape[1])
        module.weight = pack_int4(codes)
        module.weight_scale = scale.half()
        module.bias = bias
        return module

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.weight)

    def _weight_into(self, workspace: torch.Tensor) -> torch.Tensor:
        pairs = workspace.view(self.out_features, -1, 2)  # column 2j from the low nibble, 2j + 1 from the high one
        pairs[..., 0].copy_(self.weight & 15)
        pairs[..., 1].copy_(self.weight >> 4)
        return self._scale_groups(workspace.sub_(8))

    def _float_bias(self):
        return None if self.bias is None else self.bias.float()

    def _cpu_kernel(self, x2):
        a = x2.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
        weight, scales_and_zeros, bias = self._operands("cpu", torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(a, weight, self.group_size, scales_and_zeros)
        return y if bias is None else y.float() + bias

    def _operands(self, chip: str, dtype: torch.dtype):
        key = (self.weight.device, chip, dtype, tuple(t.data_ptr() for t in self.buffers()))
        if self._kernel_operands is None or self._kernel_operands[0] != key:
            codes = self.codes().int()
            if chip == "cpu":  # our nibbles are code + 8, and the zero is 0
                scale = self.weight_scale.float()
                operands = (*_int4_pack_operands(codes + 8, scale, torch.zeros_like(scale), dtype), self._float_bias())
            else:  # int4 codes in int32, logical (K, N), packed eight to an int32 along N
                weight = load_torch_npu().npu_convert_weight_to_int4pack(codes.t().contiguous())
                bias = None if self.bias is None else self.bias.to(torch.float16 if dtype == torch.float16
                                                                   else torch.float32)
                operands = (weight, self.weight_scale.to(dtype), bias)
            self._kernel_operands = (key, operands)
        return self._kernel_operands[1]

    def _npu_w8a16(self, x2, chip):
        dtype = x2.dtype if x2.dtype == torch.bfloat16 else torch.float16
        weight, scale, bias = self._operands(chip, dtype)
        # The packed weight is already the logical (K, N / 8): passed as is, not as a transposed view.
        args, kwargs = _npu_weight_quant_batchmatmul_args(x2.to(dtype), weight.t(), scale, bias, self.group_size)
        return load_torch_npu().npu_weight_quant_batchmatmul(*args, **kwargs)


_WORKSPACES = threading.local()  # per thread: a model may run in several threads at once


def _workspace(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, columns] scratch tensor of this thread, reused across calls and layers (grown when too small)."""
    key = (dtype, device)
    buffer = _WORKSPACES.__dict__.get(key)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = _WORKSPACES.__dict__[key] = torch.empty(rows * columns, dtype=dtype, device=device)
    return buffer[:rows * columns].view(rows, columns)


def _int4_pack_operands(nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
    """(packed weight, scales_and_zeros [G, N, 2]) of `_weight_int4pack_mm_for_cpu`, which computes
    x · ((nibble − 8) · scale + zero)ᵀ per group; nibbles int [N, K] in [0, 15], scale and zero [N, G]."""
    return (torch._convert_weight_to_int4pack_for_cpu(nibbles.int(), 1),
            torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous())


def _int4_halves(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Grouped int8 on the grouped int4 kernel (CPU torch has no grouped int8 one): a code c in [-128, 127] is
    16·hi + lo with lo = c mod 16 in [0, 15] and hi in [-8, 7], so s·c = (hi + 8 − 8)·16s + (lo − 8)·s + 8s: two int4
    matmuls reading 4 bits each, the int8 weight's bytes in all."""
    c = codes.to(torch.int16)
    lo = c & 15
    hi = (c - lo) // 16
    s = scale.float()
    return (_int4_pack_operands(hi + 8, 16 * s, torch.zeros_like(s), dtype),
            _int4_pack_operands(lo, s, 8 * s, dtype))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] from signed codes [N, K] in [-8, 7] (see Int4Linear)."""
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed codes int8 [N, K] from pack_int4's bytes."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)


# --- model surgery -------------------------------------------------------------------------------------------------

def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules the int8 formats quantize, in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def replace_linears(model: nn.Module, quantization: dict) -> nn.Module:
    """Swap the quantizable nn.Linear modules of a TeleChat model for empty Int8Linear ones, as the config's
    `quantization` section says; from_pretrained then loads the int8 state straight into them. Called from
    TelechatForCausalLM.__init__, so no float copy of the weights is ever loaded."""
    method, group_size, keep, lm_head = check_quantization(quantization)
    names = quantizable_linears(model)
    unknown = sorted(set(keep) - set(names))
    if unknown:
        raise TeleChatError(f"quantization float_modules names modules this model does not have: {unknown[:3]}")
    if lm_head:
        if model.config.tie_word_embeddings:
            raise TeleChatError("quantization lm_head true needs a head of its own (config.json tie_word_embeddings "
                                "false): a tied head is the embedding, which stays float")
        names.append(LM_HEAD_MODULE)
    layer = Int4Linear if method == "w4a16" else Int8Linear
    for name in names:
        if name not in keep:
            linear = model.get_submodule(name)
            set_module(model, name, layer(linear.in_features, linear.out_features, linear.bias is not None,
                                          method, group_size))
    return model


def numpy_to_torch(array) -> torch.Tensor:
    """An owned tensor of a numpy array (bf16 through its bits): a file's memory map is never what a kernel reads."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def load_converted(model_class, config, state: dict[str, torch.Tensor], dtype, folder) -> nn.Module:
    """A TeleChat model of `config` (its `quantization` section set) holding exactly `state`, the tensors of a
    quantized folder in another format already converted to ours; float tensors in `dtype` ("auto": the config's
    torch_dtype), integer codes and scales as they are. Missing, unexpected and misshapen tensors are errors."""
    if dtype == "auto":
        dtype = getattr(config, "torch_dtype", None) or torch.float16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tied = config.tie_word_embeddings
    if tied and LM_HEAD in state:  # it would load, then be replaced by the embedding without a word
        raise TeleChatError(f"{folder}: the weights hold a separate {LM_HEAD}, but config.json ties the head to the "
                            f"embedding; set \"tie_word_embeddings\": false")
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - ({LM_HEAD} if tied else set()))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{n} {list(t.shape)} (expected {list(expected[n].shape)})" for n, t in state.items()
             if n in expected and t.shape != expected[n].shape]
    problems = [f"{what}: {some_names(names, 3)}" for what, names in (
        ("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
        ("tensor(s) of the wrong shape for config.json", wrong)) if names]
    if problems:
        raise TeleChatError(f"{folder}: {'; '.join(problems)}")
    state = {name: t.to(dtype) if t.is_floating_point() and not name.endswith("_scale") else t
             for name, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            module.check_state(name, folder)
            module._operands("cpu", torch.bfloat16)  # the CPU kernels' layout now, not in the first decode step
    return model.eval()


def set_chip(model: nn.Module, chip: str | None) -> None:
    """Run every Int8Linear under `chip`'s kernel policy (e.g. "310p"), or the detected chip with None."""
    chip = normalize_chip(chip) if chip else None
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.chip = chip


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's state by kind: int8 weights, their scales, and every float tensor."""
    sizes = {"int8": 0, "scales": 0, "float": 0}
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied lm_head is the embedding
            continue
        seen.add(tensor.data_ptr())
        kind = ("int8" if tensor.dtype in (torch.int8, torch.uint8) else "scales" if name.endswith("_scale")
                else "float")
        sizes[kind] += tensor.numel() * tensor.element_size()
    return sizes
