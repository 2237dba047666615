#!/usr/bin/env bash
# Create one virtualenv per peer library under bench/.envs/<peer>, idempotently.
#
#   bash bench/peers/setup.sh            # all peers
#   bash bench/peers/setup.sh deepctr    # just one (deepctr | fuxictr | torchrec)
#   CHECK=1 bash bench/peers/setup.sh    # ... then a 2-step training smoke run per peer
#
# torch==2.13.0 is installed FIRST in every venv (a CPU wheel from the local
# wheel dir), and every later install runs with a constraints file pinning
# torch==2.13.0 so that no peer can drag in a (multi-GB) CUDA torch build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
ENVS="$BENCH/.envs"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
mkdir -p "$ENVS" "$BENCH/.out"
CONS="$ENVS/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONS"

# This machine's global pip config lists file:// indexes that do not exist; pip
# warns about each of them for every package.  Drop just those lines.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

make_venv() {  # $1 = peer name
  local env="$ENVS/$1"
  if [ ! -x "$env/bin/python" ]; then
    "$PY" -m venv "$env"
  fi
  quiet_pip "$env/bin/python" -m pip install -q --upgrade pip wheel >/dev/null
  if ! "$env/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
    quiet_pip "$env/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  fi
}

pipc() {  # $1 = peer, rest = pip args; always constrained to our torch
  local env="$ENVS/$1"; shift
  quiet_pip "$env/bin/python" -m pip install -q -c "$CONS" "$@"
}

setup_deepctr() {
  make_venv deepctr
  # deepctr-torch imports `requests` at import time but does not declare it.
  pipc deepctr "deepctr-torch==0.3.0" requests scikit-learn pandas
  "$ENVS/deepctr/bin/python" -c "import deepctr_torch, torch; print('deepctr-torch', deepctr_torch.__version__, 'torch', torch.__version__)"
}

setup_fuxictr() {
  make_venv fuxictr
  # fuxictr 2.3.x imports polars; polars 2.x breaks its API use.
  pipc fuxictr "fuxictr>=2.3,<2.4" "polars<2" scikit-learn pandas pyarrow
  "$ENVS/fuxictr/bin/python" -c "import fuxictr, torch; print('fuxictr', fuxictr.__version__, 'torch', torch.__version__)"
}

setup_torchrec() {
  make_venv torchrec
  # torchrec 1.9 does not load against torch 2.13; 1.8.0 does.  fbgemm-gpu-cpu
  # and torchrec are installed --no-deps (their declared deps would pull a
  # different torch / fbgemm-gpu CUDA build); the runtime deps torchrec
  # actually imports are installed explicitly below.
  pipc torchrec --no-deps "fbgemm-gpu-cpu==1.8.0" "torchrec==1.8.0"
  pipc torchrec numpy tqdm iopath pyre-extensions typing-inspect torchmetrics \
      tensordict scikit-learn pandas
  "$ENVS/torchrec/bin/python" -c "import torchrec, fbgemm_gpu, torch; print('torchrec', torchrec.__version__, 'fbgemm', fbgemm_gpu.__version__, 'torch', torch.__version__)"
}

peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(deepctr fuxictr torchrec)
for p in "${peers[@]}"; do
  echo "== setting up $p"
  "setup_$p"
done

# CHECK=1 bash bench/peers/setup.sh : also run 2 training steps per peer on a
# tiny generated file (proves each env imports, trains and predicts).
if [ "${CHECK:-0}" = "1" ]; then
  D="$BENCH/.data/check20k"
  [ -f "${D}_train.tsv" ] || "$PY" "$BENCH/generate.py" --rows 20000 --seed 3 --out "$D.tsv" --split --quiet
  for p in "${peers[@]}"; do
    echo "== check $p"
    "$ENVS/$p/bin/python" "$HERE/run_$p.py" --train "${D}_train.tsv" --test "${D}_test.tsv" \
        --batch-size 1024 --max-steps 2 --workdir "$BENCH/.out/check_$p" 2>"$BENCH/.out/check_$p.log" \
      || { echo "check $p FAILED, see $BENCH/.out/check_$p.log"; exit 1; }
  done
fi
