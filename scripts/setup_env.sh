#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment.  Idempotent: when the
# environment already matches pyproject.toml and this script, it only prints
# the environment report, which takes a few seconds.
#
#   VENV=.venv            where the environment lives
#   PYTHON=python3.11     interpreter used to create it
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"   pinned torch install
#   CUPY_EXTRA=cuda13     cuda13 | cuda12 | none     (CuPy wheel flavour)
#   AUTO_LIRPA_SPEC=auto_LiRPA==0.3                  used only when no auto_LiRPA is installed
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
CUPY_EXTRA=${CUPY_EXTRA:-cuda13}
AUTO_LIRPA_SPEC=${AUTO_LIRPA_SPEC:-auto_LiRPA==0.3}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

stamp_inputs() { cat pyproject.toml scripts/setup_env.sh; echo "$TORCH_SPEC $CUPY_EXTRA"; }
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
stamp="$VENV/.linf_plugin-stamp"

torch_version() { "$PY" -c 'import torch; print(torch.__version__)'; }

if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exec "$PY" -m linf_plugin.env --short
fi

if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

# torch first and pinned, so nothing later can pull another build.
echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086
"${PIP[@]}" install -q $TORCH_SPEC 2>&1 | grep -v "is ignored: it is neither" || true
echo "[setup] torch $(torch_version)"

extras="test"
[ "$CUPY_EXTRA" != "none" ] && extras="$extras,$CUPY_EXTRA"
echo "[setup] installing linf_plugin[$extras] (editable)"
"${PIP[@]}" install -q -e ".[$extras]" 2>&1 | grep -v "is ignored: it is neither" || true
echo "[setup] torch $(torch_version)"

# auto_LiRPA: never replace one the user already has (e.g. upstream 0.7.x
# installed from source).  Look it up without importing it: 0.3 does not
# import on numpy 2 until linf_plugin's compat layer has run.
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("auto_LiRPA") is None)'; then
  echo "[setup] keeping the installed auto_LiRPA"
else
  echo "[setup] installing $AUTO_LIRPA_SPEC with --no-deps (its metadata pins torch<1.13)"
  "${PIP[@]}" install -q --no-deps "$AUTO_LIRPA_SPEC" 2>&1 | grep -v "is ignored: it is neither" || true
fi
echo "[setup] torch $(torch_version)"

echo "$want" > "$stamp"
exec "$PY" -m linf_plugin.env --short
