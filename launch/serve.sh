#!/usr/bin/env bash
# Install everything (cached venv under ~/.cache), prepare the bundled model (SmolLM2-135M-
# Instruct; --model qwen-0.5b|qwen-1.5b|gemma3-270m for another) and serve it with the plugin
# and its probe on http://127.0.0.1:30000 (override: --port N; other flags go to
# sglang.launch_server).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$repo/launch/install.sh" | tail -n 1)
exec "$venv/bin/python" -m tokenwise_safety.launch.serve "$@"
