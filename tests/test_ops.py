"""pytorch_npu.ops: plain paths against explicitly written formulas, the kernel decision tables, every NPU call site
against the dispatcher schemas of the published torch-npu wheels, and the NPU branches driven on CPU through a fake
torch_npu that enforces those schemas and the documented kernel constraints."""

import math

import pytest
import torch
import torch.nn.functional as F

import npu_schema
from isolated import run_isolated
from pytorch_npu import ops
from telechat_ascend.errors import TeleChatError

MAX = 2**31 - 1


def rope_tables(seq, dim, base=10000.0):
    """cos, sin of shape [1, S, 1, D], full width: [freqs, freqs]."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).reshape(1, seq, 1, dim)
    return emb.cos().float(), emb.sin().float()


def rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]], -1)


def attention_reference(q, k, v, mask, scale):
    """softmax(q kᵀ · scale + mask) v, one batch and head at a time in float64; kv head g serves query heads
    g*r ... g*r + r - 1. Fully masked rows come out NaN."""
    b, sq, nq, d = q.shape
    skv, nkv = k.shape[1], k.shape[2]
    out = torch.empty(b, sq, nq, d, dtype=torch.float64)
    for i in range(b):
        for h in range(nq):
            g = h // (nq // nkv)
            scores = q[i, :, h].double() @ k[i, :, g].double().T * scale
            if mask is not None:
                scores = scores.masked_fill(mask.expand(b, 1, sq, skv)[i, 0], float("-inf"))
            out[i, :, h] = scores.softmax(-1) @ v[i, :, g].double()
    return out


def causal_mask(sq, skv):
    return torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq + 1)[None, None]


def padding_mask(lengths, total):
    """Left padding, [B, 1, 1, total], True = pad."""
    return torch.stack([torch.arange(total) < total - n for n in lengths])[:, None, None]


# --- plain paths against the formulas ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_casts_before_the_weight(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 64) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(64)).to(dtype)
    eps = 1e-5
    xf = x.float()
    r = xf * (xf.pow(2).mean(-1, keepdim=True) + eps) ** -0.5
    expected = w * r.to(dtype)  # TeleChat: cast back to the input dtype, then multiply by the weight
    got = ops.rms_norm(x, w, eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if dtype != torch.float32:
        assert (got != (w.float() * r).to(dtype)).any(), "multiply-then-cast should round differently somewhere"


def test_rotary_matches_the_explicit_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 16)
    cos, sin = rope_tables(6, 16)
    torch.testing.assert_close(ops.rotary(x, cos, sin), rotary_reference(x, cos, sin))
    # position 0 is the identity
    torch.testing.assert_close(ops.rotary(x, cos, sin)[:, 0], x[:, 0])


def test_rotary_casts_tables_to_the_activation_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    cos, sin = rope_tables(4, 8)
    out = ops.rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rotary_reference(x, cos.bfloat16(), sin.bfloat16()))


def test_swiglu_is_silu_gate_times_up():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(ops.swiglu(gate, up), expected)


@pytest.fixture(params=["oneDNN", "F.linear"])
def cpu_linear(request, monkeypatch):
    """Both CPU fp32 linear policies, whichever this machine's vendor selects: both run on any x86 CPU."""
    monkeypatch.setattr(ops, "CPU_ONEDNN_LINEAR", request.param == "oneDNN")
    return request.param


def linear_operands(rows, k=48, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("rows", [1, 7, 300])  # a decode step, a few rows, a prefill
def test_linear_is_x_times_w_transposed_plus_b(rows, cpu_linear):
    x, w, b = linear_operands(rows)
    expected = torch.einsum("bsk,nk->bsn", x.double(), w.double()) + b.double()
    with torch.no_grad():
        y = ops.linear(x, w, b)
        y_no_bias = ops.linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (2, rows, 40)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_no_bias.double(), expected - b.double(), rtol=1e-5, atol=1e-5)


LINEAR_ON_VIEWS = """
import sys
import torch
from safetensors.torch import load_file, save_file
from pytorch_npu import ops
ops.CPU_ONEDNN_LINEAR = sys.argv[2] == "oneDNN"
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(2, 5, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
save_file({"a": torch.zeros(3), "b": b, "w": w}, sys.argv[1])
loaded = load_file(sys.argv[1])  # views into the file's mapping, wherever its header puts them
assert loaded["w"].data_ptr() % 64 != 0, "the weights were meant to start off a cache line"
worst = 0.0
for view in (x[:, -1:], x.transpose(0, 1).contiguous().transpose(0, 1)):
    expected = view.double() @ w.double().T + b.double()
    with torch.no_grad():
        worst = max(worst, float((ops.linear(view, loaded["w"], loaded["b"]).double() - expected).abs().max()))
print(worst)
"""


def test_linear_takes_views_as_they_come(cpu_linear, tmp_path):
    # A model's last position (hidden[:, -1:]), a transposed input, and weights memory-mapped from a safetensors
    # file off a cache-line boundary; in a child process, so that a kernel that crashes on them fails this test only.
    assert float(run_isolated(LINEAR_ON_VIEWS, str(tmp_path / "w.safetensors"), cpu_linear)) < 1e-5


def test_linear_with_gradients_is_f_linear(cpu_linear):
    x, w, b = (t.requires_grad_() for t in linear_operands(3))
    ops.linear(x, w, b).square().sum().backward()
    grads = [t.grad for t in (x, w, b)]
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    (xd @ wd.T + bd).square().sum().backward()
    for got, expected in zip(grads, (xd.grad, wd.grad, bd.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_in_half_precision_is_f_linear(dtype, cpu_linear):
    x, w, b = (t.to(dtype) for t in linear_operands(3))
    with torch.no_grad():
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))


def test_linear_under_autocast_is_autocast(cpu_linear):
    x, w, b = linear_operands(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))


def test_linear_with_mixed_dtypes_is_refused_as_f_linear_refuses_it(cpu_linear):
    x, w, _ = linear_operands(1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        ops.linear(x, w.bfloat16())


ATTENTION_CASES = {
    # name: (B, Sq, Skv, Nq, Nkv, D, causal, mask)
    "mha": (2, 5, 5, 4, 4, 8, False, None),
    "causal": (2, 6, 6, 4, 4, 8, True, None),
    "gqa-causal": (2, 6, 6, 4, 2, 8, True, None),
    "left-padding-causal": (3, 6, 6, 4, 2, 8, True, padding_mask([6, 4, 1], 6)),
    "full-mask": (2, 4, 4, 2, 2, 8, False, torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.3),
    "chunk-with-cache": (1, 3, 7, 2, 2, 8, True, None),
    "decode": (3, 1, 6, 4, 2, 8, True, padding_mask([6, 4, 2], 6)),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_the_reference(case):
    b, sq, skv, nq, nkv, d, causal, mask = ATTENTION_CASES[case]
    torch.manual_seed(0)
    q, k, v = torch.randn(b, sq, nq, d), torch.randn(b, skv, nkv, d), torch.randn(b, skv, nkv, d)
    scale = 0.3  # not 1/sqrt(d): the scale must be the one passed
    full = mask
    if causal and sq > 1:
        full = causal_mask(sq, skv) if mask is None else mask | causal_mask(sq, skv)
    expected = attention_reference(q, k, v, full, scale).nan_to_num(0.0).reshape(b, sq, nq * d).float()
    got = ops.attention(q, k, v, mask, scale, causal=causal)
    assert got.shape == (b, sq, nq * d) and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, padding_mask([5, 2], 5), 1 / math.sqrt(8), causal=True)
    assert (out[1, :3] == 0).all() and (out[1, 3:] != 0).any()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (k.grad[1, :3] == 0).all(), "padded keys must get no gradient"


def test_attention_keeps_half_precision_dtype():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert ops.attention(q, q, q, None, 0.35, causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mask, heads, message",
    [
        (torch.zeros(1, 1, 4, 4), (2, 2), "bool"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.bool), (2, 2), "broadcastable"),
        (None, (3, 2), "multiple"),
    ],
)
def test_attention_rejects_bad_inputs(mask, heads, message):
    q, k = torch.randn(1, 4, heads[0], 8), torch.randn(1, 4, heads[1], 8)
    with pytest.raises(TeleChatError, match=message):
        ops.attention(q, k, k, mask, 0.35)


# --- kernel decision tables ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "device_type, chip, q_len, training, kernel",
    [
        ("cpu", "cpu", 8, True, "sdpa"),
        ("cuda", "cuda", 8, False, "sdpa"),
        ("npu", "910b", 8, True, "npu_fusion_attention"),
        ("npu", "910b", 1, False, "npu_incre_flash_attention"),
        ("npu", "910b", 1, True, "npu_fusion_attention"),
        ("npu", "950", 8, True, "npu_fusion_attention"),
        ("npu", "310p", 8, False, "npu_prompt_flash_attention"),
        ("npu", "310p", 1, False, "npu_incre_flash_attention"),
        ("npu", "310p", 8, True, "sdpa"),
        ("npu", "a3", 8, True, "sdpa"),
        ("npu", "910a", 8, True, "sdpa"),
        ("npu", "unknown", 8, False, "sdpa"),
    ],
)
def test_attention_kernel(device_type, chip, q_len, training, kernel):
    assert ops.attention_kernel(device_type, chip, q_len, training) == kernel


@pytest.mark.parametrize(
    "device_type, chip, head_dim, kernel",
    [
        ("npu", "910b", 128, "npu_rotary_mul"),
        ("npu", "910b", 160, "npu_rotary_mul"),
        ("npu", "a3", 160, "npu_rotary_mul"),
        ("npu", "310p", 128, "npu_rotary_mul"),
        ("npu", "310p", 160, "plain"),
        ("npu", "910a", 64, "plain"),
        ("npu", "unknown", 128, "plain"),
        ("cpu", "cpu", 128, "plain"),
    ],
)
def test_rotary_kernel(device_type, chip, head_dim, kernel):
    assert ops.rotary_kernel(device_type, chip, head_dim) == kernel


@pytest.mark.parametrize(
    "device_type, chip, kernel",
    [("npu", "910b", "npu_swiglu"), ("npu", "a3", "plain"), ("npu", "310p", "plain"), ("cuda", "cuda", "plain")],
)
def test_swiglu_kernel(device_type, chip, kernel):
    assert ops.swiglu_kernel(device_type, chip) == kernel


@pytest.mark.parametrize(
    "device_type, dtype, needs_grad, autocast, onednn, kernel",
    [("cpu", torch.float32, False, False, True, "onednn"), ("cpu", torch.float32, True, False, True, "plain"),
     ("cpu", torch.float32, False, True, True, "plain"), ("cpu", torch.bfloat16, False, False, True, "plain"),
     ("cpu", torch.float16, False, False, True, "plain"), ("cpu", torch.float32, False, False, False, "plain"),
     ("npu", torch.float32, False, False, True, "plain"), ("cuda", torch.float32, False, False, True, "plain")],
)
def test_linear_kernel(device_type, dtype, needs_grad, autocast, onednn, kernel, monkeypatch):
    monkeypatch.setattr(ops, "CPU_ONEDNN_LINEAR", onednn)
    assert ops.linear_kernel(device_type, dtype, needs_grad, autocast) == kernel


# --- call sites against the published schemas ----------------------------------------------------------------------

def call_sites():
    """(op, args, kwargs, expected bound values) for every way ops.py calls torch_npu."""
    torch.manual_seed(0)
    b, s, n, d = 2, 6, 4, 8
    q, kv, kv_gqa = torch.randn(b, s, n, d), torch.randn(b, s, n, d), torch.randn(b, s, 2, d)
    pad = padding_mask([6, 3], s)
    cos, sin = rope_tables(s, d)
    scale = 1 / math.sqrt(d)
    yield "npu_rms_norm", *ops._npu_rms_norm_args(q, torch.ones(d), 1e-5), {"epsilon": 1e-5}
    yield "npu_rotary_mul", *ops._npu_rotary_mul_args(q, cos, sin), {}
    yield "npu_swiglu", *ops._npu_swiglu_args(q), {"dim": -1}
    yield "npu_fusion_attention", *ops._npu_fusion_attention_args(q, kv, kv, None, scale, 0.0, MAX), {
        "head_num": n, "input_layout": "BSND", "atten_mask": None, "scale": scale, "keep_prob": 1.0}
    yield "npu_fusion_attention", *ops._npu_fusion_attention_args(q, kv_gqa, kv_gqa, pad, scale, 0.1, 0), {
        "head_num": n, "scale": scale, "keep_prob": 0.9, "pre_tockens": MAX, "next_tockens": 0, "sparse_mode": 0}
    yield "npu_prompt_flash_attention", *ops._npu_prompt_flash_attention_args(q, kv_gqa, kv_gqa, pad, scale, 0), {
        "num_heads": n, "scale_value": scale, "pre_tokens": MAX, "next_tokens": 0, "input_layout": "BSND"}
    yield "npu_incre_flash_attention", *ops._npu_incre_flash_attention_args(q[:, :1], kv_gqa, kv_gqa, pad, scale), {
        "num_heads": n, "num_key_value_heads": 2, "scale_value": scale, "input_layout": "BSND"}


CALL_SITES = [pytest.param(*site, id=site[0]) for site in call_sites()]


@pytest.mark.parametrize("op, args, kwargs, expected", CALL_SITES)
def test_call_site_binds_to_schema(version, op, args, kwargs, expected):
    fn_schema = npu_schema.schema(version, op)
    bound = npu_schema.check_call(fn_schema, args, kwargs).arguments
    if fn_schema.arguments[0].name == "self":  # the docs call it input/x: only a positional call is safe
        assert args, f"{op}: pass the input positionally"
    assert {name: bound[name] for name in expected} == expected


def test_call_sites_cover_every_kernel_used():
    used = {site.values[0] for site in CALL_SITES}
    kernels = {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu"} | {
        ops.attention_kernel("npu", chip, q_len, training)
        for chip in ("910b", "310p") for q_len in (1, 8) for training in (False, True)} - {"sdpa"}
    assert used == kernels


def test_first_result_is_the_output(version):
    """ops.py takes [0] of npu_rms_norm (y, rstd) and npu_fusion_attention (7 results); the others return one."""
    returns = {site.values[0]: len(npu_schema.schema(version, site.values[0]).returns) for site in CALL_SITES}
    assert returns == {"npu_rms_norm": 2, "npu_rotary_mul": 1, "npu_swiglu": 1, "npu_fusion_attention": 7,
                       "npu_prompt_flash_attention": 1, "npu_incre_flash_attention": 1}


def test_fusion_attention_mask_is_expanded_to_every_query_row(version):
    q = torch.randn(2, 6, 4, 8)
    args, kwargs = ops._npu_fusion_attention_args(q, q, q, padding_mask([6, 3], 6), 0.35, 0.0, MAX)
    assert kwargs["atten_mask"].shape == (2, 1, 6, 6) and kwargs["atten_mask"].is_contiguous()


@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        ("npu_rms_norm", (), {"input": torch.ones(2, 4), "gamma": torch.ones(4)}),  # the schema calls it `self`
        ("npu_fusion_attention", (torch.ones(1),) * 3 + (1, "BSND"), {"pre_tokens": 5}),  # spelled pre_tockens
        ("npu_fusion_attention", (torch.ones(1),) * 3 + (1.0, "BSND"), {}),  # head_num must be an int
        ("npu_fusion_attention", (torch.ones(1),) * 3 + (1, "BSND"), {"atten_mask": [[True]]}),  # a Tensor
        ("npu_prompt_flash_attention", (torch.ones(1),) * 3 + (4,), {}),  # num_heads is keyword-only
        ("npu_prompt_flash_attention", (torch.ones(1),) * 3, {"scale": 0.1}),  # it is scale_value here
        ("npu_incre_flash_attention", (torch.ones(1),) * 3, {"num_heads": True}),  # bool is not int
        ("npu_swiglu", (torch.ones(4),), {"dim": -1, "axis": 0}),
    ],
)
def test_checker_rejects_wrong_calls(version, op, args, kwargs):
    with pytest.raises(TypeError):
        npu_schema.check_call(npu_schema.schema(version, op), args, kwargs)


# --- NPU branches on CPU through a schema-enforcing fake torch_npu --------------------------------------------------

def _no_full_rows(mask):
    # A query row with every key masked is an "invalid row": the kernels lose precision on it (the fusion kernel
    # only handles it with inner_precise=2) and varlen forbids it, so ops.py must never send one.
    return mask is None or not mask.all(-1).any()


def _band_ok(mask, sq, skv, pre, nxt):
    # sparse_mode 0: keys outside [i - pre, i + next] are skipped, so the mask must already mask them.
    if mask is None:
        return pre == nxt == MAX
    i, j = torch.arange(sq)[:, None], torch.arange(skv)[None]
    outside = (j > i + nxt) | (j < i - pre)
    return bool(mask.expand(-1, -1, sq, skv)[..., outside].all())


def _fake_fusion_attention(query, key, value, head_num, input_layout, atten_mask, scale, keep_prob,
                           pre_tockens, next_tockens, sparse_mode, **_):
    b, sq, nq, _ = query.shape
    skv = key.shape[1]
    assert input_layout == "BSND" and head_num == nq and nq % key.shape[2] == 0 and sparse_mode == 0
    if atten_mask is not None:  # B1SS or 11SS, bool; a broadcast [B, 1, 1, S] is rejected by the kernel
        assert atten_mask.dtype == torch.bool and atten_mask.shape in ((b, 1, sq, skv), (1, 1, sq, skv))
    assert _band_ok(atten_mask, sq, skv, pre_tockens, next_tockens) and _no_full_rows(atten_mask)
    out = attention_reference(query, key, value, atten_mask, scale).to(query.dtype)
    stats = torch.zeros(b, nq, sq, 8)
    return out, stats, stats, torch.empty(0), 0, 0, 0


def _fake_prompt_flash_attention(query, key, value, atten_mask, num_heads, scale_value, pre_tokens, next_tokens,
                                 input_layout, num_key_value_heads, sparse_mode, **_):
    # 310P limits: MHA only, sparse_mode 0, pre_tokens max only, next_tokens 0 or max; contiguous inputs.
    b, sq, nq, _ = query.shape
    assert input_layout == "BSND" and num_heads == nq == key.shape[2] and num_key_value_heads == 0
    assert sparse_mode == 0 and pre_tokens == MAX and next_tokens in (0, MAX)
    assert all(t.is_contiguous() for t in (query, key, value) + ((atten_mask,) if atten_mask is not None else ()))
    if atten_mask is not None:
        assert atten_mask.dtype == torch.bool and atten_mask.shape in ((b, 1, sq, key.shape[1]), (1, 1, sq, key.shape[1]))
    assert _band_ok(atten_mask, sq, key.shape[1], pre_tokens, next_tokens) and _no_full_rows(atten_mask)
    return attention_reference(query, key, value, atten_mask, scale_value).to(query.dtype)


def _fake_incre_flash_attention(query, key, value, atten_mask, num_heads, scale_value, input_layout,
                                num_key_value_heads, **_):
    b, sq, nq, _ = query.shape
    assert sq == 1 and input_layout == "BSND" and num_heads == nq and num_key_value_heads == key.shape[2]
    assert atten_mask is None or atten_mask.shape in ((b, 1, 1, key.shape[1]), (1, 1, 1, key.shape[1]))
    assert _no_full_rows(atten_mask)
    return attention_reference(query, key, value, atten_mask, scale_value).to(query.dtype)


def _fake_rms_norm(self, gamma, epsilon):
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def _fake_rotary_mul(self, r1, r2, rotary_mode, **_):
    b, s, n, d = self.shape
    assert rotary_mode == "half" and r1.dtype == r2.dtype == self.dtype
    assert r1.shape in ((1, s, 1, d), (b, s, 1, d), (b, s, n, d))  # BSND layout
    return rotary_reference(self, r1, r2)


def _fake_swiglu(self, dim):
    a, b = self.chunk(2, dim)
    return F.silu(a) * b


FAKE_IMPLS = {
    "npu_rms_norm": _fake_rms_norm,
    "npu_rotary_mul": _fake_rotary_mul,
    "npu_swiglu": _fake_swiglu,
    "npu_fusion_attention": _fake_fusion_attention,
    "npu_prompt_flash_attention": _fake_prompt_flash_attention,
    "npu_incre_flash_attention": _fake_incre_flash_attention,
}


@pytest.fixture
def fake_npu(version, monkeypatch):
    fake = npu_schema.FakeTorchNpu(version, FAKE_IMPLS)
    monkeypatch.setattr(ops, "_device_type", lambda x: "npu")
    monkeypatch.setattr(ops, "load_torch_npu", lambda: fake)
    return fake


@pytest.mark.parametrize(
    "chip, head_dim, expected",
    [
        ("910b", 160, ["npu_rms_norm", "npu_rotary_mul", "npu_swiglu"]),
        ("a3", 160, ["npu_rms_norm", "npu_rotary_mul"]),
        ("310p", 128, ["npu_rms_norm", "npu_rotary_mul"]),
        ("310p", 160, ["npu_rms_norm"]),
    ],
)
def test_npu_branches_of_pointwise_ops(fake_npu, chip, head_dim, expected):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 2, head_dim, dtype=torch.float16)
    w = torch.randn(head_dim, dtype=torch.float16)
    cos, sin = rope_tables(5, head_dim)
    gate_up = torch.randn(2, 5, 64)

    y = ops.rms_norm(x, w, 1e-5)
    xf = x.float()
    torch.testing.assert_close(y, w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).half(),
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ops.rotary(x, cos, sin, chip=chip), rotary_reference(x, cos.half(), sin.half()))
    a, b = gate_up.chunk(2, -1)
    torch.testing.assert_close(ops.swiglu(a, b, chip=chip), a * torch.sigmoid(a) * b)
    assert [op for op, _ in fake_npu.calls] == expected


@pytest.mark.parametrize(
    "chip, case, grad, kernel",
    [
        ("910b", "left-padding-causal", True, "npu_fusion_attention"),
        ("910b", "chunk-with-cache", False, "npu_fusion_attention"),
        ("910b", "decode", False, "npu_incre_flash_attention"),
        ("910b", "decode", True, "npu_fusion_attention"),
        ("910b", "mha", False, "npu_fusion_attention"),
        ("310p", "left-padding-causal", False, "npu_prompt_flash_attention"),
        ("310p", "full-mask", False, "npu_prompt_flash_attention"),
        ("310p", "decode", False, "npu_incre_flash_attention"),
        ("310p", "left-padding-causal", True, None),
        ("910a", "causal", False, None),
    ],
)
def test_npu_attention_branches(fake_npu, chip, case, grad, kernel):
    b, sq, skv, nq, nkv, d, causal, mask = ATTENTION_CASES[case]
    torch.manual_seed(0)
    q, k, v = torch.randn(b, sq, nq, d), torch.randn(b, skv, nkv, d), torch.randn(b, skv, nkv, d)
    full = mask
    if causal and sq > 1:
        full = causal_mask(sq, skv) if mask is None else mask | causal_mask(sq, skv)
    expected = attention_reference(q, k, v, full, 0.3).nan_to_num(0.0).reshape(b, sq, nq * d).float()
    with torch.set_grad_enabled(grad):
        got = ops.attention(q.requires_grad_(grad), k, v, mask, 0.3, causal=causal, chip=chip)
    assert [op for op, _ in fake_npu.calls] == ([kernel] if kernel else [])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
