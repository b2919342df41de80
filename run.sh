#!/usr/bin/env bash
# Set-up and entry point for a fresh machine: ./run.sh demo  |  ./run.sh test [pytest args]
# Creates ./.venv on first use and installs vqz (editable) with the extras the command needs.
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }

command=${1:-}
shift || true
case "$command" in
    demo)
        pip install -e '.[diffusion]'
        exec "$venv/bin/vqz" demo "$@"
        ;;
    test)
        pip install -e '.[diffusion,vision,dev]'
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [--out DIR]   |   ./run.sh test [pytest args]" >&2
        exit 2
        ;;
esac
