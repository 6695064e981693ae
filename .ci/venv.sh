#!/usr/bin/env bash
# Makes the virtual environment .venv that the README's two commands install into:
# Debian's and Ubuntu's own Python refuse `pip install` outside one (PEP 668). Their
# Python also ships venv's pip bootstrap (ensurepip) as a package of its own,
# python3-venv (python3.X-venv); when `python3 -m venv` fails for want of it, this
# installs it with apt-get (root or sudo) and tries again. An existing .venv is kept.
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && exit 0
if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    SUDO=()
    [[ $(id -u) == 0 ]] || SUDO=(sudo)
    echo "venv: $PYTHON cannot make a virtual environment; installing python3-venv (apt-get)" >&2
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
        python3-venv "python${version}-venv" >/dev/null
    "$PYTHON" -m venv .venv
fi
echo "venv: made .venv (activate it in a new shell with: . .venv/bin/activate)" >&2
