#!/usr/bin/env bash
# Creates the SDK's venv if missing and installs the SDK (and the extras named in $1, e.g.
# "test") into it; prints the venv's python. Used by test.sh and by qemu-test, which runs the
# README examples with it.
#   OPENCOMPUTER_SDK_VENV   venv location (default: the workspace's target/sdk-venv)
set -euo pipefail

sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPENCOMPUTER_SDK_VENV:-$sdk_dir/../../target/sdk-venv}"
extras="${1:-}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
# Build from a copy so the source tree gets no build/ or *.egg-info by-products.
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
cp -r "$sdk_dir/pyproject.toml" "$sdk_dir/README.md" "$sdk_dir/opencomputer" "$build_dir/"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$build_dir${extras:+[$extras]}" >&2
echo "$(cd "$venv" && pwd)/bin/python"
