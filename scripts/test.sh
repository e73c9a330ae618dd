#!/usr/bin/env bash
# The test suite on the CPU: builds .venv and .venv-vllm if needed, then runs pytest (extra arguments are passed on).
# tests/test_vllm.py runs vLLM in .venv-vllm (its own environment: vLLM needs transformers 5).
source "$(dirname "$0")/env.sh"
bash scripts/setup-vllm.sh
pytest "$@"
