#!/usr/bin/env bash
# Creates or reuses .venv, installs Djinn and its test/bench dependencies, then
# runs the given command inside it:  bash scripts/venv.sh pytest tests -n auto
#
# torch: a machine whose python3 already has a CUDA build keeps it (the venv sees
# system site-packages); anywhere else torch is pinned to 2.13.0, the CPU build
# that lies on local disk. An unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DJINN_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

if [ ! -x "$venv/bin/python" ]; then
    if "$py" -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        echo "venv.sh: keeping the system's CUDA torch" >&2
        "$py" -m venv --system-site-packages "$venv"
    else
        "$py" -m venv "$venv"
    fi
fi
stamp="$venv/.djinn-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        "$venv/bin/python" -m pip install -q "$torch_pin"
    fi
    "$venv/bin/python" -m pip install -q -e "$root[dev]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
