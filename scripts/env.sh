# Sourced by the other scripts: makes .venv with everything a CPU machine needs (pip install -e '.[all]'), once.
# Re-installs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip  # pip 23 cannot resolve the self-referencing [all] extra
    .venv/bin/pip install --quiet -e '.[all]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
