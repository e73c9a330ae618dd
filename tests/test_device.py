"""pytorch_npu.device on a CPU-only machine: device specs and LOCAL_RANK, the errors for missing NPU/CUDA, chip
detection from SoC ids and names, the dtype policy per chip and the distributed backend. NPU presence is simulated
with a stand-in torch_npu module."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from pytorch_npu import device
from telechat_ascend.device import parse_device
from telechat_ascend.errors import TeleChatError

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def fresh_probe():
    """Forget the cached torch_npu probe and chip before and after the test."""
    for cached in (device._probe_torch_npu, device.npu_chip):
        cached.cache_clear()
    yield
    for cached in (device._probe_torch_npu, device.npu_chip):
        cached.cache_clear()


@pytest.fixture
def no_torch_npu(fresh_probe, monkeypatch):
    """Make `import torch_npu` fail (ImportError), whatever is installed."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)


@pytest.fixture
def fake_torch_npu(fresh_probe, monkeypatch):
    """A stand-in torch_npu with two NPUs (an Ascend910B2) in sys.modules."""
    module = types.ModuleType("torch_npu")
    module.npu = types.SimpleNamespace(
        device_count=lambda: 2, set_device=lambda index: None, get_device_name=lambda: "Ascend910B2"
    )
    module._C = types.SimpleNamespace(_npu_get_soc_version=lambda: 222)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter that sees pytorch_npu.device and .ops but not the package __init__ (which
    imports transformers, seconds of start-up this check does not need)."""
    prelude = """
        import sys, types
        package = types.ModuleType("pytorch_npu")
        package.__path__ = ["pytorch_npu"]
        sys.modules["pytorch_npu"] = package
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)], capture_output=True, text=True,
        timeout=120, env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1],
    )


def test_import_is_lazy_and_npu_resolves_in_a_fresh_process():
    # A fresh interpreter: the import check needs clean sys.modules, and torch.device("npu") needs the privateuse1
    # backend renamed, which cannot be undone.
    result = run_python("""
        import torch

        class Recorder:  # notes every attempt to find torch_npu, then lets the normal import machinery go on
            attempts = []

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "torch_npu":
                    self.attempts.append(name)

        sys.meta_path.insert(0, Recorder())
        import pytorch_npu.ops
        from pytorch_npu import device
        assert not Recorder.attempts and "torch_npu" not in sys.modules, Recorder.attempts
        device.load_torch_npu()
        assert "torch_npu" in Recorder.attempts, "the recorder should see the lazy import"

        torch.utils.rename_privateuse1_backend("npu")
        calls = []
        fake = types.ModuleType("torch_npu")
        fake.npu = types.SimpleNamespace(device_count=lambda: 4, set_device=calls.append)
        sys.modules["torch_npu"] = fake
        device._probe_torch_npu.cache_clear()
        assert device.resolve_device("npu") == torch.device("npu", 2)
        assert device.resolve_device("auto") == torch.device("npu", 2)
        assert device.resolve_device("npu:3") == torch.device("npu", 3)
        assert calls == [2, 2, 3], calls
    """, LOCAL_RANK="2")
    assert result.returncode == 0, result.stderr


# --- device specs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, env, expected",
    [
        ("cpu", {"LOCAL_RANK": "3"}, ("cpu", None)),
        ("auto", {"LOCAL_RANK": "3"}, ("auto", None)),
        ("npu", {}, ("npu", 0)),
        ("npu", {"LOCAL_RANK": "3"}, ("npu", 3)),
        ("cuda", {"LOCAL_RANK": "1"}, ("cuda", 1)),
        ("npu:2", {"LOCAL_RANK": "3"}, ("npu", 2)),
        (" CUDA:0 ", {}, ("cuda", 0)),
    ],
)
def test_parse_device(spec, env, expected):
    assert parse_device(spec, env) == expected


@pytest.mark.parametrize(
    "spec, env, message",
    [
        ("gpu", {}, "unknown device"),
        ("cpu:1", {}, "unknown device"),
        ("npu:-1", {}, "unknown device"),
        ("npu", {"LOCAL_RANK": "x"}, "LOCAL_RANK"),
    ],
)
def test_parse_device_errors(spec, env, message):
    with pytest.raises(TeleChatError, match=message):
        parse_device(spec, env)


def test_cpu_and_auto_resolve_to_cpu_here(no_torch_npu):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.resolve_device("auto") == torch.device("cpu")


def test_npu_without_torch_npu_explains_how_to_fix_it(no_torch_npu):
    with pytest.raises(TeleChatError) as error:
        device.resolve_device("npu")
    message = str(error.value)
    assert "torch-npu" in message and "set_env.sh" in message and "pip install torch-npu==" in message
    assert device.load_torch_npu() is None and "import of torch_npu halted" in device.torch_npu_error()
    assert device.torch_npu_error() in message  # the underlying reason


def test_npu_index_beyond_visible_devices(fake_torch_npu, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    with pytest.raises(TeleChatError, match=r"npu:2 requested but only 2 NPU .*ASCEND_RT_VISIBLE_DEVICES=4,5"):
        device.resolve_device("npu:2")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(TeleChatError, match=r"npu:5 \(from LOCAL_RANK=5\)"):
        device.resolve_device("npu")


def test_auto_prefers_a_visible_npu(fake_torch_npu):
    assert device._auto_kind() == "npu"
    fake_torch_npu.npu.device_count = lambda: 0
    assert device._auto_kind() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TeleChatError, match="no NPU is visible"):
        device.resolve_device("npu")


def test_cuda_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TeleChatError, match="CUDA is not available"):
        device.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(TeleChatError, match=r"cuda:1 requested but only 1 CUDA .*CUDA_VISIBLE_DEVICES=7"):
        device.resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TeleChatError, match=r"cuda:2 \(from LOCAL_RANK=2\)"):
        device.resolve_device("cuda")


@pytest.mark.parametrize(
    "dev, backend",
    [(torch.device("cpu"), "gloo"), ("cpu", "gloo"), ("npu:1", "hccl"), ("npu", "hccl"), ("cuda:0", "nccl")],
)
def test_dist_backend(dev, backend):
    assert device.dist_backend(dev) == backend


def test_dist_backend_rejects_other_devices():
    with pytest.raises(TeleChatError, match="mps"):
        device.dist_backend("mps")


# --- chips ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "soc, chip",
    [(100, "910a"), (104, "910a"), (200, "310p"), (202, "310p"), (205, "310p"), (220, "910b"), (225, "910b"),
     (240, "unknown"), (250, "a3"), (260, "950"), (-1, "unknown")],
)
def test_chip_from_soc_version(soc, chip):
    assert device.chip_from_soc_version(soc) == chip


@pytest.mark.parametrize(
    "name, chip",
    [("Ascend910B2", "910b"), ("Ascend910B4-1", "910b"), ("Ascend910B2C", "910b"), ("Ascend910B", "910a"),
     ("Ascend910ProB", "910a"), ("Ascend910A", "910a"), ("Ascend310P3", "310p"), ("Ascend910_9391", "a3"),
     ("Ascend310B4", "unknown"), ("", "unknown")],
)
def test_chip_from_name(name, chip):
    assert device.chip_from_name(name) == chip


def test_npu_chip_from_name_then_soc_id(fake_torch_npu):
    assert device.soc_name() == "Ascend910B2" and device.npu_chip() == "910b"
    device.npu_chip.cache_clear()
    fake_torch_npu.npu.get_device_name = lambda: "Ascend-future"
    fake_torch_npu._C._npu_get_soc_version = lambda: 203
    assert device.npu_chip() == "310p"
    assert device.resolve_dtype("npu:0", None) == fp16


@pytest.mark.parametrize("spec, chip", [("A2", "910b"), ("310P", "310p"), ("Ascend310P3", "310p"), ("cpu", "cpu")])
def test_normalize_chip(spec, chip):
    assert device.normalize_chip(spec) == chip


def test_unknown_chip_is_refused():
    with pytest.raises(TeleChatError, match="unknown chip"):
        device.normalize_chip("tpu")


# --- dtype policy --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "chip, requested, dtype",
    [
        ("cpu", None, fp32), ("cpu", "bf16", bf16), ("cpu", "float32", fp32),
        ("910b", None, bf16), ("910b", "fp16", fp16), ("910b", "fp32", fp32), ("a2", "bfloat16", bf16),
        ("a3", None, bf16), ("950", None, bf16),
        ("310p", None, fp16), ("310p", "half", fp16), ("310p", "FP16", fp16),
        ("910a", None, fp16), ("910a", "fp32", fp32),
    ],
)
def test_dtype_policy(chip, requested, dtype):
    assert device.resolve_dtype("cpu", requested, chip=chip) == dtype


@pytest.mark.parametrize(
    "chip, requested, message",
    [
        ("310p", "bf16", "310P.*fp16 only.*no bf16"),
        ("310p", "fp32", "fp32 is refused because"),
        ("cpu", "fp16", "fp16 on CPU"),
        ("910a", "bf16", "no bf16"),
        ("910b", "fp8", "unknown dtype"),
    ],
)
def test_dtype_policy_refusals(chip, requested, message):
    with pytest.raises(TeleChatError, match=message):
        device.resolve_dtype(torch.device("cpu"), requested, chip=chip)


def test_dtype_follows_the_device_when_no_chip_is_given():
    assert device.resolve_dtype(torch.device("cpu"), None) == fp32
    with pytest.raises(TeleChatError, match="fp16 on CPU"):
        device.resolve_dtype("cpu", "fp16")


@pytest.mark.parametrize("bf16_ok, default", [(True, bf16), (False, fp16)])
def test_cuda_dtype_follows_bf16_support(monkeypatch, bf16_ok, default):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_ok)
    assert device.resolve_dtype("cuda:0", None) == default
    assert device.resolve_dtype("cuda:0", "fp32") == fp32
    if not bf16_ok:
        with pytest.raises(TeleChatError, match="does not support bf16"):
            device.resolve_dtype("cuda:0", "bf16")


@pytest.mark.parametrize("text, vendor", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n",
     "AuthenticAMD"),
    ("processor\t: 0\nvendor_id\t: GenuineIntel\n", "GenuineIntel"),
    ("processor\t: 0\nBogoMIPS\t: 100.00\nCPU implementer\t: 0x48\n", ""),  # aarch64 (Kunpeng) says no vendor_id
])
def test_cpu_vendor_reads_proc_cpuinfo(text, vendor, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert device.cpu_vendor(str(path)) == vendor


def test_cpu_vendor_without_proc_cpuinfo_is_empty(tmp_path):
    assert device.cpu_vendor(str(tmp_path / "absent")) == ""
