#!/usr/bin/env bash
# The test suite on the CPU: builds .venv if needed, then runs pytest (extra arguments are passed on).
source "$(dirname "$0")/env.sh"
pytest "$@"
