"""TeleChat's hot ops: a torch_npu fused kernel on NPU where the chip has one, plain PyTorch everywhere else.

The implementation is chosen from the tensor's device and the chip (see `device.py`), never by catching kernel
errors. Each NPU call site assembles its arguments in a small `_npu_*_args` function returning (args, kwargs), so the
tests can bind exactly what is passed against the dispatcher schemas shipped in the torch-npu wheel. The plain paths
follow TeleChat's reference math and the documented semantics of the fused kernels.

Layouts: activations are BSND ([batch, seq, heads, head_dim]); attention masks are bool with True = masked out
(the NPU convention), broadcastable to [B, 1, Sq, Skv].

Kernel per op and chip (910b = Atlas A2, 310p = Atlas 300I Pro/Duo; "plain" runs on NPU too):

| op       | 910b           | a3             | 910a, 310p                      | cpu, cuda |
|----------|----------------|----------------|---------------------------------|-----------|
| rms_norm | npu_rms_norm   | npu_rms_norm   | npu_rms_norm                    | plain     |
| rotary   | npu_rotary_mul | npu_rotary_mul | npu_rotary_mul if head_dim 128  | plain     |
| swiglu   | npu_swiglu     | plain          | plain                           | plain     |
| linear   | plain          | plain          | plain                           | plain, or oneDNN on a non-Intel x86 CPU |

Attention depends on the phase as well: see `attention_kernel`; linear on the CPU on the dtype and on gradients: see
`linear_kernel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from telechat_ascend.errors import TeleChatError

from .device import cpu_vendor, load_torch_npu, normalize_chip, npu_chip

MAX_TOKENS = 2**31 - 1  # "no limit" for the pre/next token bands of the NPU attention kernels


def _device_type(x: torch.Tensor) -> str:
    # The one place the device is read, so the tests can drive the NPU branches on CPU with a fake torch_npu.
    return x.device.type


def _chip(device_type: str, chip: str | None) -> str:
    if chip is not None:
        return normalize_chip(chip)
    return npu_chip() if device_type == "npu" else device_type


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through an op on these tensors: the fused kernels without a backward
    must not run then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to costs ~1.5 µs of argument parsing even when it returns x itself; fp32 decoding made four such no-op
    # casts per layer (with the no-op dropout calls, 1.5% of a decode step, measured).
    return x if x.dtype == dtype else x.to(dtype)


# --- Linear --------------------------------------------------------------------------------------------------------

# F.linear in fp32 calls MKL on x86, whose tuned kernels run on Intel CPUs; on others (AMD EPYC Zen 4, measured) its
# one-row GEMV stays on one thread at 13.6 GB/s where oneDNN's inner product reads 32 GB/s on two, and its GEMMs
# run at 0.7-0.95x oneDNN's. On Intel CPUs MKL's fp32 GEMV was measured at the copy bandwidth, so it stays there.
CPU_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                     and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                     and cpu_vendor() not in ("GenuineIntel", ""))


def linear_kernel(device_type: str, dtype: torch.dtype, needs_grad: bool, autocast: bool = False) -> str:
    """"onednn" (torch's `mkldnn._linear_pointwise`, the op torch.compile's CPU backend emits for linear layers) or
    "plain" (F.linear). oneDNN for fp32 on CPUs where CPU_ONEDNN_LINEAR holds, and only without gradients (the op
    has no backward) and outside autocast (which casts F.linear's operands, not this op's). bf16 and fp16 F.linear
    already run on oneDNN."""
    if device_type == "cpu" and dtype == torch.float32 and not (needs_grad or autocast) and CPU_ONEDNN_LINEAR:
        return "onednn"
    return "plain"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weightᵀ + bias for x [..., K] and weight [N, K], as F.linear."""
    same_dtype = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    device_type = _device_type(x)
    autocast = device_type == "cpu" and torch.is_autocast_enabled(device_type)
    if same_dtype and linear_kernel(device_type, x.dtype, _needs_grad(x, weight, bias), autocast) == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# --- RMSNorm -------------------------------------------------------------------------------------------------------

def _npu_rms_norm_args(x, weight, eps):
    # The schema calls the input `self` (the docs say `input`): pass it positionally.
    return (x, weight), {"epsilon": float(eps)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis: statistics in fp32, cast back to x's dtype, then times the weight (TeleChat's
    order; the fused kernel matches it up to rounding)."""
    if _device_type(x) == "npu":
        args, kwargs = _npu_rms_norm_args(x, weight, eps)
        return load_torch_npu().npu_rms_norm(*args, **kwargs)[0]  # returns (y, rstd)
    xf = _cast(x, torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * _cast(normed, x.dtype)


# --- Rotary position embedding ------------------------------------------------------------------------------------

def rotary_kernel(device_type: str, chip: str, head_dim: int) -> str:
    """"npu_rotary_mul" or "plain". A2/A3 take any even head_dim < 896; 910A and 310P only have the jit-compiled
    variant, which requires head_dim 128 (so TeleChat-12B, head_dim 160, runs plain there)."""
    if device_type == "npu":
        if chip in ("910b", "a3") and head_dim % 2 == 0 and head_dim < 896:
            return "npu_rotary_mul"
        if chip in ("910a", "310p") and head_dim == 128:
            return "npu_rotary_mul"
    return "plain"


def _npu_rotary_mul_args(x, cos, sin):
    return (x, cos, sin), {}  # default rotary_mode 'half' = rotate_half


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chip: str | None = None) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [B, S, N, D] and full-width cos/sin ([freqs, freqs]) of shape
    [B or 1, S, 1, D]. cos/sin are cast to x's dtype, as the fused kernel requires."""
    cos, sin = _cast(cos, x.dtype), _cast(sin, x.dtype)
    device_type = _device_type(x)
    if rotary_kernel(device_type, _chip(device_type, chip), x.shape[-1]) == "npu_rotary_mul":
        args, kwargs = _npu_rotary_mul_args(x, cos, sin)
        return load_torch_npu().npu_rotary_mul(*args, **kwargs)
    return x * cos + _rotate_half(x) * sin


# --- SwiGLU --------------------------------------------------------------------------------------------------------

def swiglu_kernel(device_type: str, chip: str) -> str:
    """"npu_swiglu" (Atlas A2 only) or "plain"."""
    return "npu_swiglu" if device_type == "npu" and chip == "910b" else "plain"


def _npu_swiglu_args(gate_up):
    return (gate_up,), {"dim": -1}


def swiglu(gate: torch.Tensor, up: torch.Tensor, chip: str | None = None) -> torch.Tensor:
    """silu(gate) * up. The fused kernel takes the two halves concatenated; the plain path multiplies them as they
    are (concatenating costs a copy forward and another backward)."""
    device_type = _device_type(gate)
    if swiglu_kernel(device_type, _chip(device_type, chip)) == "npu_swiglu":
        args, kwargs = _npu_swiglu_args(torch.cat([gate, up], dim=-1))
        return load_torch_npu().npu_swiglu(*args, **kwargs)
    return F.silu(gate) * up


# --- Attention -----------------------------------------------------------------------------------------------------

def attention_kernel(device_type: str, chip: str, q_len: int, training: bool) -> str:
    """Which attention implementation runs ("training" = gradients or dropout needed).

    One-token decode uses incremental flash attention (A2 and 310P), the kernel made for it (no backward). Training
    and prefill use npu_fusion_attention where it exists (A2, 950; not 310P, 910A, and A3 is not in its product
    table); 310P prefills with prompt flash attention (fp16, MHA). Everything else, training on 310P included,
    uses SDPA.
    """
    if device_type != "npu":
        return "sdpa"
    if not training and q_len == 1 and chip in ("910b", "310p"):
        return "npu_incre_flash_attention"
    if chip in ("910b", "950"):
        return "npu_fusion_attention"
    if chip == "310p" and not training:
        return "npu_prompt_flash_attention"
    return "sdpa"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # GQA: kv head g serves query heads g*groups ... g*groups + groups - 1.
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _full_mask(mask: torch.Tensor, sq: int, skv: int) -> torch.Tensor:
    # The NPU kernels reject a broadcast [B, 1, 1, Skv] mask: give them every query row, materialized.
    return mask.expand(mask.shape[0], 1, sq, skv).contiguous()


def _npu_fusion_attention_args(q, k, v, mask, scale, dropout_p, next_tokens):
    _, sq, nq, _ = q.shape
    kwargs = {
        "atten_mask": None if mask is None else _full_mask(mask, sq, k.shape[1]),
        "scale": float(scale),  # the kernel's default is 1.0, not 1/sqrt(d)
        "keep_prob": 1.0 - dropout_p,
        # Spelled "tockens" in this schema; the band must agree with the mask (sparse_mode 0 = full mask).
        "pre_tockens": MAX_TOKENS,
        "next_tockens": next_tokens,
        "sparse_mode": 0,
    }
    return (q, k, v, nq, "BSND"), kwargs  # GQA is native: head_num counts query heads


def _npu_prompt_flash_attention_args(q, k, v, mask, scale, next_tokens):
    _, sq, nq, _ = q.shape
    # On 310P the kernel is MHA only (num_key_value_heads 0) and wants contiguous inputs.
    k, v = _repeat_kv(k, nq // k.shape[2]), _repeat_kv(v, nq // v.shape[2])
    kwargs = {
        "atten_mask": None if mask is None else _full_mask(mask, sq, k.shape[1]),
        "num_heads": nq,
        "scale_value": float(scale),
        # 310P accepts only pre_tokens 2147483647 (torch-npu 2.5.1's default is 2147473647) and next_tokens 0 or max.
        "pre_tokens": MAX_TOKENS,
        "next_tokens": next_tokens,
        "input_layout": "BSND",
        "sparse_mode": 0,
    }
    return (q.contiguous(), k.contiguous(), v.contiguous()), kwargs


def _npu_incre_flash_attention_args(q, k, v, mask, scale):
    kwargs = {
        "atten_mask": mask,  # [B, 1, 1, Skv]: one query row
        # GQA is native here on A2 and 310P alike.
        "num_heads": q.shape[2],
        "scale_value": float(scale),
        "input_layout": "BSND",
        "num_key_value_heads": k.shape[2],
    }
    return (q, k, v), kwargs


def _sdpa(q, k, v, mask, scale, dropout_p, is_causal=False):
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), _repeat_kv(k, groups).transpose(1, 2), _repeat_kv(v, groups).transpose(1, 2)
    # An additive bias rather than a bool mask: SDPA's bool masks mean True = attend (the opposite of ours), and
    # torch_npu's SDPA has mishandled bool masks (Ascend/pytorch#88); a bias means the same on every backend.
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale,
                                         is_causal=is_causal)
    return out.transpose(1, 2)


def _combine_masks(mask, causal, b, sq, skv, device):
    """(mask, dead): the padding mask OR-ed with the causal one, and the query rows it masks completely."""
    causal_mask = None
    if causal:
        # Bottom-right aligned: with Skv - Sq cached keys, query i sees keys up to Skv - Sq + i.
        causal_mask = torch.ones(sq, skv, dtype=torch.bool, device=device).triu(skv - sq + 1)[None, None]
    if mask is None:
        return causal_mask, None
    target = (b, 1, sq, skv)
    if mask.dtype != torch.bool or mask.dim() != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target)):
        raise TeleChatError(
            f"attention mask must be bool (True = masked out) and broadcastable to {list(target)}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    if causal_mask is not None:
        mask = mask | causal_mask
    # Rows with every key masked (queries at left-padding positions) would give softmax 0/0 = NaN in the output and
    # in every input's gradient. Let them see what causality alone allows; their output is zeroed afterwards.
    dead = mask.all(-1, keepdim=True)
    fallback = causal_mask if causal_mask is not None else torch.zeros((), dtype=torch.bool, device=device)
    return torch.where(dead, fallback, mask), dead


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    causal: bool = False,
    chip: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) · v for q [B, Sq, Nq, D] and k, v [B, Skv, Nkv, D] (Nq a multiple of Nkv).

    mask: bool, True = masked out, broadcastable to [B, 1, Sq, Skv], or None. causal adds the causal mask
    (bottom-right aligned when Skv > Sq, i.e. with a KV cache). Query rows with every key masked give zeros.
    Dropout is applied whenever dropout_p > 0: pass 0 at inference. Returns [B, Sq, Nq * D].
    """
    b, sq, nq, d = q.shape
    skv, nkv = k.shape[1], k.shape[2]
    if nq % nkv:
        raise TeleChatError(f"attention: {nq} query heads are not a multiple of {nkv} key/value heads")
    if causal and sq > skv:
        raise TeleChatError(f"causal attention needs at least as many keys as queries, got {skv} < {sq}")
    causal = causal and sq > 1  # one query attends to every key: nothing to mask
    plain_causal = causal and mask is None and sq == skv  # SDPA's is_causal: no mask to build
    mask, dead = _combine_masks(mask, causal, b, sq, skv, q.device)
    # A causal mask (Sq = Skv) lets the kernels skip every block above the diagonal; otherwise the mask decides.
    next_tokens = 0 if causal and sq == skv else MAX_TOKENS

    device_type = _device_type(q)
    needs_grad = _needs_grad(q, k, v)
    kernel = attention_kernel(device_type, _chip(device_type, chip), sq, training=needs_grad or dropout_p > 0)
    if kernel == "npu_fusion_attention":
        args, kwargs = _npu_fusion_attention_args(q, k, v, mask, scale, dropout_p, next_tokens)
        out = load_torch_npu().npu_fusion_attention(*args, **kwargs)[0]  # (out, softmax_max, softmax_sum, ...)
    elif kernel == "npu_prompt_flash_attention":
        args, kwargs = _npu_prompt_flash_attention_args(q, k, v, mask, scale, next_tokens)
        out = load_torch_npu().npu_prompt_flash_attention(*args, **kwargs)
    elif kernel == "npu_incre_flash_attention":
        args, kwargs = _npu_incre_flash_attention_args(q, k, v, mask, scale)
        out = load_torch_npu().npu_incre_flash_attention(*args, **kwargs)
    else:
        out = _sdpa(q, k, v, None if plain_causal else mask, scale, dropout_p, is_causal=plain_causal)

    out = out.reshape(b, sq, nq * d)
    return out if dead is None else out.masked_fill(dead.squeeze(1), 0.0)
