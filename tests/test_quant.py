"""Int8 TeleChat (pytorch_npu.quant, pytorch_npu.quantize): the quantization math against written-out formulas, the
int8 layers against float ones and against the int8 GEMM, the kernels really used, the folder format and its loading
through transformers, the commands, smoothing, and every NPU call site against the published torch-npu schemas and
their documented semantics (through a schema-enforcing fake torch_npu)."""

import copy
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import npu_schema
from conftest import train_on
from isolated import run_isolated
from pytorch_npu import inference, quant
from pytorch_npu.configuration_telechat import TelechatConfig
from pytorch_npu.modeling_telechat import TelechatForCausalLM, TelechatLinear
from pytorch_npu.quantize import (compare, input_absmax, load_for_eval, quantize_folder,
                                  quantize_model, smooth)
from telechat_ascend.cli import build_parser
from telechat_ascend.errors import TeleChatError
from telechat_ascend.tokenizer import TINY_CORPUS, TeleChatTokenizer, build_tiny_tokenizer


INT8_METHODS = ("w8a16", "w8a8")


def small_config(**overrides):
    values = dict(vocab_size=4096, hidden_size=64, n_layer=2, n_head=4, ffn_hidden_size=160,
                  tie_word_embeddings=False, seq_length=1024)
    return TelechatConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """The models here are tiny: fork-join overhead dominates their matmuls, and on a busy 2-core machine two threads
    made this module 5× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """A small TeleChat trained for 40 steps on a few lines of the bundled corpus: peaked, non-trivial next-token
    distributions (perplexity ≈ 2 on its text), saved as a float folder with the tiny tokenizer. Also the text (as a
    file and as ids) and a calibration jsonl."""
    folder = tmp_path_factory.mktemp("float")
    build_tiny_tokenizer(folder)
    text = "\n".join(TINY_CORPUS.read_text(encoding="utf-8").splitlines()[:25])
    torch.manual_seed(0)
    model = TelechatForCausalLM(small_config())
    ids = TeleChatTokenizer.from_pretrained(folder).encode(text)
    train_on(model, ids, 40)
    model.eval().save_pretrained(folder)
    (folder / "text.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": line}, ensure_ascii=False) for line in text.splitlines()]
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, model, ids


def calibration(ids):
    return [torch.tensor(ids[i:i + 64]) for i in range(0, len(ids), 64)]


# --- quantization math ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [0, 32])
def test_quantize_weight_is_symmetric_absmax(group_size):
    torch.manual_seed(0)
    w = torch.randn(6, 64) * torch.logspace(-2, 1, 6)[:, None]  # rows of very different ranges
    q, scale = quant.quantize_weight(w, group_size)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert scale.shape == ((6, 2) if group_size else (6,))
    for row in range(6):
        for g, cols in enumerate([range(0, 32), range(32, 64)] if group_size else [range(64)]):
            cols = list(cols)
            s = (w[row, cols].abs().max() / 127).half().float()
            assert scale.reshape(6, -1)[row, g].float() == s
            expected = torch.clamp(torch.round(w[row, cols] / s), -127, 127)
            assert torch.equal(q[row, cols].float(), expected)
            assert (w[row, cols] - q[row, cols].float() * s).abs().max() <= s / 2 * (1 + 1e-3)
    assert q.abs().max() == 127  # each row (group) reaches the end of the grid


def test_per_row_quantization_is_layout_agnostic():
    """key_value's rows are interleaved per head; any row permutation (de-interleaving included) commutes with
    per-row quantization, and groups never mix rows."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    perm = torch.randperm(16)
    for group_size in (0, 32):
        q, scale = quant.quantize_weight(w, group_size)
        q_perm, scale_perm = quant.quantize_weight(w[perm], group_size)
        assert torch.equal(q_perm, q[perm]) and torch.equal(scale_perm, scale[perm])
    # A group's scale sees only its own 32 inputs.
    w2 = w.clone()
    w2[:, 40] = 100.0
    _, before = quant.quantize_weight(w, 32)
    _, after = quant.quantize_weight(w2, 32)
    assert torch.equal(after[:, 0], before[:, 0]) and (after[:, 1] > before[:, 1]).all()


def test_dequantize_weight_inverts_the_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for group_size in (0, 32):
        q, scale = quant.quantize_weight(w, group_size)
        assert (quant.dequantize_weight(q, scale) - w).abs().max() <= scale.float().max() / 2 * (1 + 1e-3)


# --- the int8 layer on CPU -----------------------------------------------------------------------------------------

def reference(x, module):
    """x·(q·s)ᵀ + b in float64, x first rounded to the int8 grid for w8a8; a per-group scale covers group_size
    consecutive inputs of its row."""
    scale = module.weight_scale.double()
    if scale.dim() == 2:
        scale = scale.repeat_interleave(module.in_features // scale.shape[1], dim=1)
    else:
        scale = scale[:, None]
    w = module.weight.double() * scale
    x = x.double()
    if module.method == "w8a8":
        x = torch.clamp(torch.round(x / module.input_scale.double()), -127, 127) * module.input_scale.double()
    y = x @ w.T
    return y if module.bias is None else y + module.bias.double()


@pytest.fixture(params=["dot products", "none"])
def cpu_dot_products(request, monkeypatch):
    """Both CPU prefill policies: int8 and bf16 dot products (int_mm, dequant_bf16) and neither (fp32 dequant). Every
    path runs on any x86 CPU, only its speed differs."""
    present = request.param == "dot products"
    monkeypatch.setattr(quant, "CPU_INT8_DOT", present)
    monkeypatch.setattr(quant, "CPU_BF16_DOT", present)
    return present


# The CPU kernels with bf16 activations and outputs (2^-8 relative); int_mm is exact, fp32 dequant nearly.
TOLERANCE = {"int8pack_mm": 1e-2, "int4pack_mm": 1e-2, "dequant_bf16": 1e-2, "int_mm": 1e-6, "dequant": 1e-5}


@pytest.mark.parametrize("method, group_size", [("w8a16", 0), ("w8a16", 32), ("w8a8", 0)])
@pytest.mark.parametrize("rows", [1, 40])  # decode (the int8 kernel) and prefill
def test_int8_linear_matches_its_formula_and_the_float_layer(method, group_size, rows, cpu_dot_products):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, rows, 64)
    input_scale = float(x.abs().max()) / 127
    module = quant.Int8Linear.from_float(linear, method, group_size, input_scale)
    with torch.no_grad():
        y, y_float = module(x), linear(x)
    assert y.dtype == torch.float32 and y.shape == y_float.shape
    exact = reference(x, module)
    kernel = quant.int8_kernel("cpu", "cpu", method, rows * 2, 64, group_size, 48)
    assert (y.double() - exact).norm() / exact.norm() < TOLERANCE[kernel]
    bound = 0.01 if method == "w8a16" else 0.03
    assert (y - y_float).norm() / y_float.norm() < bound


def test_w8a8_on_cpu_is_the_int8_gemm(cpu_dot_products):
    """Every CPU path gives the int8 × int8 → int32 product (torch._int_mm) times the two scales."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    x = torch.randn(40, 64)
    module = quant.Int8Linear.from_float(linear, "w8a8", 0, float(x.abs().max()) / 127)
    x_int8 = quant.round_activation(x, module.input_scale).to(torch.int8)
    gemm = torch._int_mm(x_int8, module.weight.T.contiguous()).double()
    expected = gemm * module.weight_scale.double() * module.input_scale.double()
    assert quant.int8_kernel("cpu", "cpu", "w8a8", 40, 64, 0) == ("int_mm" if cpu_dot_products else "dequant")
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), expected, rtol=1e-6, atol=1e-6)  # int_mm or fp32: exact
        decode = module(x[:1]).double()
    assert (decode - expected[:1]).norm() / expected[:1].norm() < 1e-2  # int8 kernel: bf16 output rounding


@pytest.mark.parametrize("method, group_size", [("w8a16", 0), ("w8a16", 32), ("w8a8", 0), ("w4a16", 32)])
@pytest.mark.parametrize("dot_products, kernel", [(True, {"w8a8": "int_mm"}), (False, {})])
def test_cpu_prefill_kernel_follows_the_dot_products(monkeypatch, method, group_size, dot_products, kernel):
    monkeypatch.setattr(quant, "CPU_INT8_DOT", dot_products)
    monkeypatch.setattr(quant, "CPU_BF16_DOT", dot_products)
    expected = kernel.get(method, "dequant_bf16" if dot_products and method != "w8a8" else "dequant")
    assert quant.int8_kernel("cpu", "cpu", method, 17, 256, group_size, 64) == expected


def test_prefill_kernels_reuse_one_workspace_per_thread():
    """Layers rebuild their weight in one scratch tensor of the thread; another thread gets its own."""
    torch.manual_seed(0)
    layers = [quant.Int8Linear.from_float(nn.Linear(64, n), "w8a16", 32) for n in (48, 32)]
    x = torch.randn(20, 64)
    with torch.no_grad():
        first = [layer(x) for layer in layers]
        workspace = quant._workspace(1, 1, torch.bfloat16, x.device).data_ptr()
        again = [layer(x) for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(quant._workspace(1, 1, torch.bfloat16, x.device).data_ptr()))
    thread.start()
    thread.join()
    assert seen and seen[0] != workspace


@pytest.mark.parametrize(
    "device_type, chip, method, rows, k, group, kernel",
    [
        ("cpu", "cpu", "w8a16", 1, 64, 0, "int8pack_mm"),
        ("cpu", "cpu", "w8a8", 16, 64, 0, "int8pack_mm"),
        ("cpu", "cpu", "w8a16", 1, 60, 0, "dequant"),  # the kernel's aligned loads need K % 8 == 0
        ("cpu", "cpu", "w8a16", 1, 64, 32, "int4pack_mm"),  # two int4 halves per code
        ("cpu", "cpu", "w8a16", 1, 64, 36, "dequant"),  # a group of 36 inputs breaks the 8-aligned loads
        ("cpu", "cpu", "w4a16", 1, 256, 128, "int4pack_mm"),
        ("cpu", "cpu", "w4a16", 1, 256, 512, "dequant"),  # the int4 kernel takes groups of 32..256
        ("npu", "910b", "w4a16", 1, 256, 128, "npu_weight_quant_batchmatmul"),
        ("cuda", "cuda", "w8a16", 1, 64, 0, "dequant"),
        ("npu", "910b", "w8a16", 1, 64, 32, "npu_weight_quant_batchmatmul"),
        ("npu", "310p", "w8a16", 900, 64, 0, "npu_weight_quant_batchmatmul"),
        ("npu", "910b", "w8a8", 1, 64, 0, "npu_quant_matmul"),
        ("npu", "310p", "w8a8", 1, 64, 0, "npu_quant_matmul"),
    ],
)
def test_int8_kernel(device_type, chip, method, rows, k, group, kernel):
    assert quant.int8_kernel(device_type, chip, method, rows, k, group) == kernel


def test_310p_refuses_group_scales():
    with pytest.raises(TeleChatError, match="per channel"):
        quant.int8_kernel("npu", "310p", "w8a16", 1, 64, 32)


def test_kernel_handles_offset_views():
    """hidden[:, -1:] is an offset view: the int8 kernel must get an aligned copy (it crashes on the view)."""
    module = quant.Int8Linear.from_float(nn.Linear(64, 8), "w8a16")
    hidden = torch.randn(1, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(hidden[:, -1:]), module(hidden[:, -1:].clone()))


# --- a quantized model ---------------------------------------------------------------------------------------------

def quantized_copy(model, method, **kwargs):
    model = copy.deepcopy(model)
    with torch.no_grad():
        record = quantize_model(model, method, **kwargs)
    return model, record


def test_quantized_model_holds_int8_and_decodes_on_the_int8_kernel(trained):
    _, model, ids = trained
    int8_model, _ = quantized_copy(model, "w8a16")
    linears = quant.quantizable_linears(model)
    assert len(linears) == 12
    for name in linears:
        module = int8_model.get_submodule(name)
        assert isinstance(module, quant.Int8Linear) and module.weight.dtype == torch.int8
    state = int8_model.state_dict()
    assert all(state[f"{name}.weight"].dtype == torch.int8 for name in linears)
    float_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in linears)
    int8_bytes = sum(state[f"{n}.weight"].numel() + state[f"{n}.weight_scale"].numel() * 2 for n in linears)
    assert int8_bytes < 0.27 * float_bytes
    sizes = quant.weight_bytes(int8_model)
    assert sizes["int8"] == sum(model.get_submodule(n).weight.numel() for n in linears)

    prompt = torch.tensor([ids[:12]])
    with torch.no_grad():
        past = int8_model(prompt, use_cache=True).past_key_values
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            int8_model(prompt[:, -1:], past_key_values=past, use_cache=True)
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("aten::_weight_int8pack_mm") == len(linears)
    assert calls.get("aten::mm", 0) + calls.get("aten::addmm", 0) <= 1  # lm_head only, the one float linear


def test_tied_embeddings_are_counted_once():
    model = TelechatForCausalLM(small_config(tie_word_embeddings=True))
    sizes = quant.weight_bytes(model)
    assert sizes["float"] == sum(p.numel() for p in model.parameters()) * 4


def test_w8a16_and_w8a8_keep_perplexity_and_greedy_tokens(trained):
    _, model, ids = trained
    results = {}
    for method, kwargs in [("w8a16", {}), ("w8a16", {"group_size": 32}), ("w8a8", {"calibration": calibration(ids)})]:
        int8_model, _ = quantized_copy(model, method, **kwargs)
        results[method, bool(kwargs.get("group_size"))] = compare(model, int8_model, ids, 128)
    for (method, _), result in results.items():
        assert result["ppl_float"] < 4, "the fixture model should predict its text well"
        assert result["ppl_increase"] <= (0.01 if method == "w8a16" else 0.03)
        assert result["greedy_agreement"] >= (0.98 if method == "w8a16" else 0.95)
        assert result["logits_rel_error"] < (0.01 if method == "w8a16" else 0.05)


def inject_outliers(model):
    """A copy computing the same function, but with a few RMSNorm output channels 30-60× larger and the following
    weight columns shrunk to match: the activation outliers of real LLMs, which per-tensor scales cannot absorb."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.transformer.h:
            for j, c in ((3, 60.0), (17, 30.0)):
                for norm, consumers in ((block.input_layernorm, (block.self_attention.query,
                                                                 block.self_attention.key_value)),
                                        (block.post_attention_layernorm, (block.mlp.gate_proj, block.mlp.up_proj))):
                    norm.weight[j] *= c
                    for linear in consumers:
                        linear.weight[:, j] /= c
    return model


def test_smoothing_is_exact_in_float_and_rescues_w8a8_from_outliers(trained):
    _, model, ids = trained
    outliers = inject_outliers(model)
    calib = calibration(ids)
    names = quant.quantizable_linears(outliers)

    smoothed = copy.deepcopy(outliers)
    smooth(smoothed, input_absmax(smoothed, names, calib), alpha=0.5)
    assert compare(outliers, smoothed, ids, 128)["logits_rel_error"] < 1e-5

    plain = copy.deepcopy(outliers)  # w8a8 without smoothing: absmax activation scales only
    act_max = input_absmax(plain, names, calib)
    with torch.no_grad():
        for name in names:
            quant.set_module(plain, name, quant.Int8Linear.from_float(plain.get_submodule(name), "w8a8", 0,
                                                                      float(act_max[name].max()) / 127))
    int8_model, _ = quantized_copy(outliers, "w8a8", calibration=calib)
    without, with_smoothing = compare(outliers, plain, ids, 128), compare(outliers, int8_model, ids, 128)
    assert without["ppl_increase"] > 0.05
    assert with_smoothing["ppl_increase"] <= 0.03
    assert with_smoothing["logits_rel_error"] < without["logits_rel_error"] / 4


def test_keep_float_keeps_the_most_sensitive_linears(trained):
    _, model, ids = trained
    int8_model, record = quantized_copy(model, "w8a8", calibration=calibration(ids), keep_float=2)
    kl = record["sensitivity"]["kl"]
    assert len(kl) == 12 and all(value >= 0 for value in kl.values())
    assert set(record["float_modules"]) == set(sorted(kl, key=kl.get)[-2:])
    assert int8_model.config.quantization["float_modules"] == record["float_modules"]
    for name in quant.quantizable_linears(model):
        kept = type(int8_model.get_submodule(name)) is TelechatLinear
        assert kept == (name in record["float_modules"])


# --- folder format, loading, commands ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_folders(trained, tmp_path_factory):
    folder, _, _ = trained
    out = tmp_path_factory.mktemp("int8")
    parser = build_parser()
    for method, extra in (("w8a16", []), ("w8a8", ["--calib", str(folder / "calib.jsonl"), "--keep-float", "1"])):
        args = parser.parse_args(["quantize", "--method", method, "--model", str(folder), "--out",
                                  str(out / method), *extra])
        assert args.run(args) is None
    return out


def test_folder_holds_int8_tensors_scales_and_the_config(int8_folders):
    folder = int8_folders / "w8a8"
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((folder / "quant_config.json").read_text())
    assert config["quantization"] == {"method": "w8a8", "group_size": 0, "float_modules": record["float_modules"]}
    assert len(record["float_modules"]) == 1 and record["calibration"]["prompts"] >= 20
    assert (folder / "tokenizer.model").is_file() and (folder / "generation_config.json").is_file()
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    kept = record["float_modules"][0]
    for name in quant.quantizable_linears(TelechatForCausalLM(small_config())):
        if name == kept:
            assert dtypes[f"{name}.weight"] == "F32" and f"{name}.weight_scale" not in dtypes
        else:
            assert dtypes[f"{name}.weight"] == "I8" and dtypes[f"{name}.weight_scale"] == "F16"
            assert dtypes[f"{name}.input_scale"] == "F32"
    assert dtypes["transformer.word_embeddings.weight"] == dtypes["lm_head.weight"] == "F32"


def test_auto_model_loads_the_int8_folder(trained, int8_folders):
    _, model, ids = trained
    loaded = AutoModelForCausalLM.from_pretrained(int8_folders / "w8a16")
    assert isinstance(loaded.transformer.h[0].mlp.down_proj, quant.Int8Linear)
    assert loaded.transformer.h[0].mlp.down_proj.weight.dtype == torch.int8
    in_memory, _ = quantized_copy(model, "w8a16")
    x = torch.tensor([ids[:20]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, in_memory(x).logits)


def test_eval_quant_reports_both_perplexities(trained, int8_folders, capsys):
    folder, _, _ = trained
    parser = build_parser()
    for method, limit in (("w8a16", 0.01), ("w8a8", 0.03)):
        args = parser.parse_args(["eval-quant", "--float", str(folder), "--int8", str(int8_folders / method),
                                  "--text", str(folder / "text.txt"), "--seq-len", "128"])
        capsys.readouterr()
        args.run(args)
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] > 400 and result["ppl_float"] < 4
        assert result["ppl_increase"] <= limit and result["greedy_agreement"] >= 0.95


def test_310p_policy_runs_fp16(int8_folders):
    model = load_for_eval(int8_folders / "w8a16", soc="310p")
    assert model.transformer.word_embeddings.weight.dtype == torch.float16
    assert all(m.chip == "310p" for m in model.modules() if isinstance(m, quant.Int8Linear))
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "w8a8"], "calibration"),
        (["--method", "w8a16", "--keep-float", "2"], "--calib"),
        (["--method", "w8a8", "--calib", "missing.jsonl"], "not found"),
        (["--method", "w8a16", "--group-size", "48"], "multiple of 32"),
        (["--method", "w8a16", "--group-size", "32", "--soc", "310p"], "310P"),
        (["--method", "w8a16", "--keep-float", "99", "--calib", "calib.jsonl"], "between 0"),
    ],
)
def test_quantize_rejects_bad_input(trained, tmp_path, argv, message):
    folder, _, _ = trained
    argv = [str(folder / a) if a.endswith(".jsonl") else a for a in argv]
    with pytest.raises(TeleChatError, match=message):
        quantize_folder(folder, tmp_path / "out", **_options(argv))
    assert not (tmp_path / "out").exists()


def _options(argv):
    parser = build_parser()
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o", *argv])
    return dict(method=args.method, calib=args.calib, group_size=args.group_size, keep_float=args.keep_float,
                soc=args.soc, bits=args.bits, damp_percent=args.damp_percent)


def test_quantize_rejects_bad_folders_and_methods(trained, int8_folders, tmp_path):
    folder, _, _ = trained
    with pytest.raises(TeleChatError, match="unknown quantization method"):
        quantize_folder(folder, tmp_path / "a", "w4a8")
    with pytest.raises(TeleChatError, match="not found"):
        quantize_folder(tmp_path, tmp_path / "b", "w8a16")  # no config.json
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TeleChatError, match="not 'telechat'"):
        quantize_folder(tmp_path / "llama", tmp_path / "c", "w8a16")
    with pytest.raises(TeleChatError, match="already quantized"):
        quantize_folder(int8_folders / "w8a16", tmp_path / "d", "w8a16")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"answer": 1}\n')
    with pytest.raises(TeleChatError, match="bad.jsonl:2"):
        quantize_folder(folder, tmp_path / "e", "w8a8", calib=bad)
    parser = build_parser()
    with pytest.raises(SystemExit):  # argparse lists the valid methods
        parser.parse_args(["quantize", "--method", "int4", "--model", "m", "--out", "o"])


def test_eval_quant_rejects_a_float_folder_as_int8(trained):
    folder, _, _ = trained
    parser = build_parser()
    args = parser.parse_args(["eval-quant", "--float", str(folder), "--int8", str(folder), "--text",
                              str(folder / "text.txt")])
    with pytest.raises(TeleChatError, match="no int8 layers"):
        args.run(args)


def test_bad_quantization_sections_are_rejected():
    model = TelechatForCausalLM(small_config())
    for section, message in [({"method": "w4"}, "unknown quantization method"),
                             ({"method": "w8a8", "group_size": 32}, "per-channel"),
                             ({"method": "w8a16", "float_modules": ["lm_head"]}, "does not have")]:
        with pytest.raises(TeleChatError, match=message):
            quant.replace_linears(model, section)


# --- NPU call sites against the published schemas ------------------------------------------------------------------

def check_call(fn_schema, args, kwargs):
    """npu_schema.check_call, also accepting a torch.dtype for an int argument: torch-npu 2.13 declares output_dtype
    `int?` and 2.5.1 `ScalarType?` (an int to the dispatcher), and the dispatcher converts a dtype for both."""
    dtypes = {name for name, value in kwargs.items() if isinstance(value, torch.dtype)}
    types = {arg.name: arg.type for arg in fn_schema.arguments}
    for name in dtypes:
        kind = types.get(name)
        kind = kind.getElementType() if kind is not None and kind.kind() == "OptionalType" else kind
        if kind is None or kind.kind() != "IntType":
            raise TypeError(f"{fn_schema.name}: {name} does not take a dtype")
    bound = npu_schema.signature(fn_schema).bind(*args, **kwargs)
    npu_schema.check_call(fn_schema, args, {k: v for k, v in kwargs.items() if k not in dtypes})
    return bound


def call_sites():
    torch.manual_seed(0)
    x16, xbf = torch.randn(3, 64, dtype=torch.float16), torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scale, groups = torch.rand(48, dtype=torch.float16), torch.rand(48, 2, dtype=torch.float16)
    yield "npu_weight_quant_batchmatmul", *quant._npu_weight_quant_batchmatmul_args(
        x16, w, scale, torch.zeros(48, dtype=torch.float16), 0), {"antiquant_group_size": 0}
    yield "npu_weight_quant_batchmatmul", *quant._npu_weight_quant_batchmatmul_args(
        xbf, w, groups.bfloat16(), torch.zeros(48), 32), {"antiquant_group_size": 32}
    yield "npu_quant_matmul", *quant._npu_quant_matmul_args(
        torch.ones(3, 64, dtype=torch.int8), w, torch.rand(48), torch.zeros(48, dtype=torch.int32),
        torch.float16), {"output_dtype": torch.float16}
    yield "npu_format_cast", (w, quant.ACL_FORMAT_FRACTAL_NZ), {}, {"acl_format": 29}


CALL_SITES = [pytest.param(*site, id=f"{site[0]}-{i}") for i, site in enumerate(call_sites())]


@pytest.mark.parametrize("op, args, kwargs, expected", CALL_SITES)
def test_call_site_binds_to_schema(version, op, args, kwargs, expected):
    bound = check_call(npu_schema.schema(version, op), args, kwargs).arguments
    assert {name: bound[name] for name in expected} == expected


def test_weight_is_passed_as_the_transposed_view():
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    args, _ = quant._npu_weight_quant_batchmatmul_args(torch.ones(3, 64, dtype=torch.float16), w,
                                                       torch.ones(48, 2, dtype=torch.float16), None, 32)
    assert args[1].shape == (64, 48) and args[1].data_ptr() == w.data_ptr() and not args[1].is_contiguous()
    assert args[2].shape == (2, 48)  # per group: (K / group, N)
    args, _ = quant._npu_quant_matmul_args(torch.ones(3, 64, dtype=torch.int8), w, torch.ones(48), None,
                                           torch.float16)
    assert args[1].shape == (64, 48) and args[1].data_ptr() == w.data_ptr()


@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        ("npu_weight_quant_batchmatmul", (torch.ones(1),) * 3, {"group_size": 32}),  # antiquant_group_size
        ("npu_weight_quant_batchmatmul", (torch.ones(1),) * 3, {"antiquant_group_size": 32.0}),  # an int
        ("npu_weight_quant_batchmatmul", (), {"input": torch.ones(1), "weight": torch.ones(1),
                                              "antiquant_scale": torch.ones(1)}),  # it is x
        ("npu_quant_matmul", (torch.ones(1),) * 4, {}),  # offset and everything after scale are keyword-only
        ("npu_quant_matmul", (torch.ones(1),) * 3, {"dtype": torch.float16}),  # output_dtype
        ("npu_quant_matmul", (torch.ones(1),) * 3, {"output_dtype": "fp16"}),
        ("npu_quant_matmul", (torch.ones(1),) * 3, {"bias": 0}),
    ],
)
def test_checker_rejects_wrong_calls(version, op, args, kwargs):
    with pytest.raises(TypeError):
        check_call(npu_schema.schema(version, op), args, kwargs)


def test_weight_dtype_is_not_in_2_5_1():
    # 2.13 added weight_dtype (int4 packing); passing it would break on 2.5.1, so the call sites never do.
    with pytest.raises(TypeError):
        check_call(npu_schema.schema("2.5.1", "npu_weight_quant_batchmatmul"), (torch.ones(1),) * 3,
                   {"weight_dtype": 1})


# --- NPU branches on CPU through a fake torch_npu ------------------------------------------------------------------

class FakeQuantNpu:
    """torch_npu for the int8 ops on CPU: every call is bound against the wheel's schema and checked against the
    documented constraints of `chip`, then computed with the documented formula."""

    def __init__(self, version, chip):
        self.version, self.chip, self.calls, self.nz = version, chip, [], set()

    def __getattr__(self, op):
        if op.startswith("_"):
            raise AttributeError(op)
        impl = getattr(self, "_" + op)
        fn_schema = npu_schema.schema(self.version, op)

        def call(*args, **kwargs):
            bound = check_call(fn_schema, args, kwargs)
            self.calls.append(op)
            bound.apply_defaults()
            return impl(**{"input" if name == "self" else name: value for name, value in bound.arguments.items()})

        return call

    def _npu_format_cast(self, input, acl_format, **_):
        assert acl_format == 29 and input.is_contiguous()
        out = input.clone()
        self.nz.add(out.data_ptr())
        return out

    def _npu_convert_weight_to_int4pack(self, weight, inner_k_tiles, **_):
        # Documented: int32 holding int4 values, last dimension a multiple of 8; eight values per int32 along it.
        assert self.chip != "310p" and weight.dtype == torch.int32 and weight.shape[-1] % 8 == 0
        assert weight.min() >= -8 and weight.max() <= 7 and inner_k_tiles == 0
        nibbles = (weight & 15).reshape(*weight.shape[:-1], -1, 8)
        return sum(nibbles[..., i] << (4 * i) for i in range(8)).to(torch.int32)

    def _npu_weight_quant_batchmatmul(self, x, weight, antiquant_scale, antiquant_offset, quant_scale, quant_offset,
                                      bias, antiquant_group_size, inner_precise, **_):
        assert x.dim() == 2
        k, n = x.shape[1], antiquant_scale.shape[-1]
        if weight.dtype == torch.int32:  # int4 packed eight to an int32 along N (A2/A3 only)
            assert self.chip != "310p" and weight.shape == (k, n // 8)
            nibbles = torch.stack([(weight >> (4 * i)) & 15 for i in range(8)], -1).reshape(k, n)
            weight = torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)
        assert weight.dtype == torch.int8 and weight.shape == (k, n)
        assert x.dtype in ((torch.float16,) if self.chip == "310p" else (torch.float16, torch.bfloat16))
        assert antiquant_scale.dtype == x.dtype and quant_scale is None and inner_precise == 0
        group = antiquant_group_size
        if group:
            assert self.chip != "310p" and group % 32 == 0 and 32 <= group <= k - 1
            assert antiquant_scale.shape == (k // group, n)
            scale = antiquant_scale.float().repeat_interleave(group, 0)
        else:
            assert antiquant_scale.shape in ((n,), (1, n))
            scale = antiquant_scale.float().reshape(1, n)
        offset = 0 if antiquant_offset is None else antiquant_offset.float()
        y = x.float() @ ((weight.float() + offset) * scale)  # offset before scale
        if bias is not None:
            assert bias.dtype == (torch.float16 if x.dtype == torch.float16 else torch.float32)
            y = y + bias.float()
        return y.to(x.dtype)

    def _npu_quant_matmul(self, x1, x2, scale, offset, pertoken_scale, bias, output_dtype, **_):
        k, n = x1.shape[1], x2.shape[1]
        assert x1.dtype == x2.dtype == torch.int8 and x2.shape == (k, n)
        if scale.dtype == torch.float16:
            raise RuntimeError("aclnn 161002: scale not implemented for DT_FLOAT16")
        assert scale.dtype == torch.float32 and scale.shape in ((1,), (n,)) and offset is None
        assert output_dtype in ((torch.float16,) if self.chip == "310p" else (torch.float16, torch.bfloat16))
        if self.chip == "310p":  # transposed, then NZ: the (N, K) NZ tensor passed as its transposed view
            assert pertoken_scale is None and x2.data_ptr() in self.nz and x2.stride() == (1, k)
        acc = x1.long() @ x2.long()
        if bias is not None:
            assert bias.dtype == torch.int32
            acc = acc + bias.long()
        return (acc.double() * scale.double()).to(output_dtype)


@pytest.mark.parametrize(
    "chip, method, group_size, dtype",
    [
        ("910b", "w8a16", 0, torch.bfloat16),
        ("910b", "w8a16", 32, torch.float16),
        ("910b", "w8a8", 0, torch.bfloat16),
        ("310p", "w8a16", 0, torch.float16),
        ("310p", "w8a8", 0, torch.float16),
    ],
)
def test_npu_branches_match_the_cpu_path(version, monkeypatch, chip, method, group_size, dtype):
    torch.manual_seed(0)
    fake = FakeQuantNpu(version, chip)
    x = torch.randn(2, 3, 64)
    module = quant.Int8Linear.from_float(nn.Linear(64, 48), method, group_size, float(x.abs().max()) / 127)
    with torch.no_grad():
        expected = module(x)  # CPU
        module.chip = chip
        monkeypatch.setattr(quant, "_device_type", lambda t: "npu")
        monkeypatch.setattr(quant, "load_torch_npu", lambda: fake)
        got = module(x.to(dtype))
        module(x.to(dtype))  # the derived operands (NZ weight, int32 bias, scales) are built once
    kernel = "npu_quant_matmul" if method == "w8a8" else "npu_weight_quant_batchmatmul"
    setup = ["npu_format_cast"] if (chip, method) == ("310p", "w8a8") else []
    assert fake.calls == setup + [kernel, kernel]
    assert got.dtype == dtype and got.shape == (2, 3, 48)
    assert (got.float() - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_npu_int4_branch_matches_the_cpu_path(version, monkeypatch, dtype):
    """Int4Linear (4-bit GPTQ) on A2: codes packed by npu_convert_weight_to_int4pack, then the grouped
    npu_weight_quant_batchmatmul; 310P refuses it."""
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (48, 256), dtype=torch.int8)
    module = quant.Int4Linear.from_codes(codes, (torch.rand(48, 2) * 0.01 + 0.001).half(), torch.randn(48))
    x = torch.randn(3, 256)
    fake = FakeQuantNpu(version, "910b")
    with torch.no_grad():
        expected = module(x)
        module.chip = "910b"
        monkeypatch.setattr(quant, "_device_type", lambda t: "npu")
        monkeypatch.setattr(quant, "load_torch_npu", lambda: fake)
        got = module(x.to(dtype))
        module(x.to(dtype))
    assert fake.calls == ["npu_convert_weight_to_int4pack", "npu_weight_quant_batchmatmul",
                          "npu_weight_quant_batchmatmul"]
    assert (got.float() - expected).norm() / expected.norm() < 1e-2
    module.chip = "310p"
    with pytest.raises(TeleChatError, match="no int4 matmul"):
        module(x.half())


def test_npu_operands_follow_a_reloaded_state(version, monkeypatch):
    """The derived NPU operands (NZ weight, int32 bias, fp32 scales) are rebuilt when load_state_dict replaces the
    state in place."""
    torch.manual_seed(0)
    fake = FakeQuantNpu(version, "310p")
    x = torch.randn(3, 64)
    first, second = (quant.Int8Linear.from_float(nn.Linear(64, 48), "w8a8", 0, float(x.abs().max()) / 127)
                     for _ in range(2))
    with torch.no_grad():
        expected = second(x)
        first.chip = "310p"
        monkeypatch.setattr(quant, "_device_type", lambda t: "npu")
        monkeypatch.setattr(quant, "load_torch_npu", lambda: fake)
        first(x.half())
        first.load_state_dict(second.state_dict())
        got = first(x.half())
    assert fake.calls == ["npu_format_cast", "npu_quant_matmul"] * 2
    assert (got.float() - expected).norm() / expected.norm() < 1e-2


@pytest.mark.parametrize("method", INT8_METHODS)
def test_cpu_kernel_scales_follow_a_reloaded_state(method):
    """The bf16 scales the CPU int8 kernel takes are derived once, and again when load_state_dict replaces the
    state in place: after reloading, a decode-sized call gives what the module it was loaded from gives."""
    torch.manual_seed(0)
    x = torch.randn(1, 64)
    first, second = (quant.Int8Linear.from_float(nn.Linear(64, 48), method, 0, float(x.abs().max()) / 127)
                     for _ in range(2))
    with torch.no_grad():
        before = first(x)
        first.load_state_dict(second.state_dict())
        assert not torch.equal(before, second(x))
        assert torch.equal(first(x), second(x))


# --- memory handed to the native int8 kernel ------------------------------------------------------------------------

MISALIGNED_STATE = """
    import sys, torch
    from torch import nn
    from pytorch_npu import quant
    offset, rows, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    x = torch.randn(rows, 128)
    source = quant.Int8Linear.from_float(nn.Linear(128, 64), method, 0, float(x.abs().max()) / 127)
    # The state as a memory-mapped safetensors file hands it over: views starting `offset` bytes into a buffer.
    state = {}
    for name, tensor in source.state_dict().items():
        raw = torch.zeros(tensor.numel() * tensor.element_size() + 64, dtype=torch.uint8)
        view = raw[offset:offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        state[name] = view
    module = quant.Int8Linear(128, 64, True, method)
    module.load_state_dict(state, assign=True)
    assert quant.int8_kernel("cpu", "cpu", method, rows, 128, 0) == "int8pack_mm"
    with torch.no_grad():
        y = module(x)
    assert all(b.data_ptr() % quant.KERNEL_ALIGNMENT == 0 for b in module.buffers()), "buffers left unaligned"
    w = module.weight.double() * module.weight_scale.double()[:, None]
    a = x.double()
    if method == "w8a8":
        a = torch.clamp(torch.round(a / module.input_scale.double()), -127, 127) * module.input_scale.double()
    ref = a @ w.T + module.bias.double()
    print(float((y.double() - ref).norm() / ref.norm()))
"""


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("offset", [4, 8, 12])
def test_int8_kernel_survives_misaligned_loaded_weights(offset, method):
    """The crash on AVX-512 CPUs: `_weight_int8pack_mm` with an int8 weight 4/8/12 bytes past a 16-byte boundary
    (where a memory-mapped safetensors file puts it) and 4-16 activation rows. Each case runs in a child process, so
    a segfault fails the test; the result must also be the int8 formula's (bf16 activations: ~0.5% error)."""
    for rows in (4, 8, 16):
        error = float(run_isolated(MISALIGNED_STATE, str(offset), str(rows), method))
        assert error < 1e-2, (rows, error)


def write_misaligned_safetensors(src: Path, dst: Path, residue: int) -> None:
    """A copy of a safetensors file, written by hand, whose int8 tensors all start `residue` bytes past a 16-byte
    boundary: they come first (their sizes are multiples of 16) and spaces pad the JSON header, as the format allows.
    (The format wants the tensors packed without gaps, so the float ones after them fall where they fall.)"""
    raw = src.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_size])
    data = raw[8 + header_size:]
    metadata = header.pop("__metadata__", None)
    names = sorted(header, key=lambda name: header[name]["dtype"] != "I8")
    entries, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        assert header[name]["dtype"] != "I8" or (end - begin) % 16 == 0
        entries[name] = dict(header[name], data_offsets=[offset, offset + end - begin])
        blobs.append(data[begin:end])
        offset += end - begin
    text = json.dumps(entries).encode()
    text += b" " * ((residue - 8 - len(text)) % 16)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_generate_survives_misaligned_int8_folders(trained, int8_folders, tmp_path):
    """`telechat-ascend generate` on w8a16 and w8a8 folders whose int8 tensors sit 4, 8 and 12 bytes past a 16-byte
    boundary of the file answers a multi-token prompt with the aligned folder's greedy tokens (child processes)."""
    folder, _, ids = trained
    _, tokenizer = inference.load_model(folder)
    prompt = tokenizer.decode(ids[:10])
    outputs = set()
    for method in ("w8a16", "w8a8"):
        for residue in (4, 8, 12):
            copy_dir = tmp_path / f"{method}-{residue}"
            shutil.copytree(int8_folders / method, copy_dir)
            write_misaligned_safetensors(int8_folders / method / "model.safetensors",
                                         copy_dir / "model.safetensors", residue)
            with safe_open(copy_dir / "model.safetensors", "pt") as f:
                assert f.get_tensor("transformer.h.0.mlp.up_proj.weight").dtype == torch.int8
            out = run_isolated("from telechat_ascend.cli import main; raise SystemExit(main())", "generate",
                               "--model", str(copy_dir), "--prompt", prompt, "--max-new-tokens", "8",
                               "--no-do-sample")
            outputs.add((method, out))
    expected = inference.generate_text(inference.load_model(folder)[0], tokenizer, prompt, max_new_tokens=8,
                                       do_sample=False)
    assert {out.strip() for _, out in outputs} == {expected.strip()}
