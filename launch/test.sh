#!/usr/bin/env bash
# Install what the tests need (cached venv under ~/.cache, see install.sh), prepare the
# bundled model, and run the whole suite against real SGLang servers on 127.0.0.1.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the quick part).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$repo/launch/install.sh" | tail -n 1)
cd "$repo"
"$venv/bin/python" -m tokenwise_safety.bundled >/dev/null
set +e
"$venv/bin/python" -m pytest -ra "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit "$rc"
