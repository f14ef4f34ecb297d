#!/usr/bin/env bash
# Creates the test venv if missing, installs the SDK with its test extra, runs pytest.
# The real-appliance tests run when OPENCOMPUTER_APPLIANCE_BIN names the built
# `appliance` binary, and are skipped (with the reason) otherwise.
#   OPENCOMPUTER_SDK_VENV   venv location (default: the workspace's target/sdk-venv)
#   extra arguments         passed to pytest
set -euo pipefail

sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPENCOMPUTER_SDK_VENV:-$sdk_dir/../../target/sdk-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Build from a copy so the source tree gets no build/ or *.egg-info by-products.
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
cp -r "$sdk_dir/pyproject.toml" "$sdk_dir/README.md" "$sdk_dir/opencomputer" "$build_dir/"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$build_dir[test]"

# The pytest executable (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed package.
cd "$sdk_dir"
exec "$venv/bin/pytest" -p no:cacheprovider "$@"
