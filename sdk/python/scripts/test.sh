#!/usr/bin/env bash
# Creates the test venv if missing, installs the SDK with its test extra, runs pytest.
# The real-appliance tests run when OPENCOMPUTER_APPLIANCE_BIN names the built
# `appliance` binary, and are skipped (with the reason) otherwise.
#   OPENCOMPUTER_SDK_VENV   venv location (default: the workspace's target/sdk-venv)
#   extra arguments         passed to pytest
set -euo pipefail

sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$sdk_dir/scripts/venv.sh" test)"

# The pytest executable (not `python -m pytest`) keeps the source tree off sys.path, so
# the tests import the installed package.
cd "$sdk_dir"
exec "$(dirname "$python")/pytest" -p no:cacheprovider "$@"
