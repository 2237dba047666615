#!/usr/bin/env bash
# One prepared check on a CUDA machine: the CUDA tests, the example end to end on the GPU, and the speed
# benchmark with --device cuda (deepfm bf16 and fp32 against DeepCTR-Torch on the same GPU, same run).
#
#   WHEELS=.whl ROWS=2000000 OUT=/tmp/gpu bash bench/gpu_check.sh
#   PARTS=amx WHEELS=.whl bash bench/gpu_check.sh   # only: the CPU benchmark pinned to 2 cores of that host
#
# PARTS (default "tests example bench") picks sections; "amx" runs the CPU benchmark (250k rows, deepfm
# bf16/fp32 vs DeepCTR-Torch) on 2 cores of the GPU host's CPU, which has AMX: the hardware the speed
# targets of issue #3 assume, and the dev machine lacks.
#
# For a machine without internet: WHEELS is a folder of wheels for the packages the image lacks (deepfm's
# polars/pydantic, and deepctr_torch for the peer); they are installed with --no-index into private
# folders. Without WHEELS the current python environment is used as it is. FuxiCTR (pins polars<2) and
# torchrec (its fbgemm-gpu CUDA build must match the image's torch) are left out on the GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/deepfm-gpu}"; ROWS="${ROWS:-2000000}"; PY="${PYTHON:-python3}"; DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls "$WHEELS"/*.whl | grep -v deepctr) || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deepctr \
      "$WHEELS"/deepctr*.whl || exit 1
  export PYTHONPATH="$ROOT/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  # the benchmark runs each peer with bench/.envs/<peer>/bin/python: a wrapper over this python
  rm -rf bench/.envs && mkdir -p bench/.envs/deepctr/bin
  printf '#!/bin/sh\nPYTHONPATH=/tmp/deepctr:%s exec %s "$@"\n' "$PYTHONPATH" "$(command -v "$PY")" \
      > bench/.envs/deepctr/bin/python
  chmod +x bench/.envs/deepctr/bin/python
fi
nvidia-smi -L | tee "$OUT/log.txt"
"$PY" -c "import torch, polars, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'polars', polars.__version__, 'pydantic', pydantic.__version__)" | tee -a "$OUT/log.txt"

PARTS="${PARTS:-tests example bench}"
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

if want tests; then
echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fm.py tests/test_explain.py 2>&1 | tail -15 | tee -a "$OUT/log.txt"

fi
if want example; then
echo "== the example on the GPU"
{ "$PY" -m deepfm train examples/criteo/config.yaml --output /tmp/gpu-run --set train.device=$DEVICE --no-progress &&
  "$PY" -m deepfm predict /tmp/gpu-run examples/criteo/data/test.tsv --output /tmp/gpu-pred.csv --device $DEVICE \
      --no-progress && head -3 /tmp/gpu-pred.csv &&
  "$PY" -m deepfm explain /tmp/gpu-run examples/criteo/data/test.tsv --device $DEVICE --output /tmp/gpu-explain |
      head -8; } 2>&1 | tail -20 | tee -a "$OUT/log.txt"

fi
if want bench; then
echo "== benchmark, $ROWS rows"
"$PY" bench/run_all.py --rows "$ROWS" --skip-setup --device "$DEVICE" --quiet-wait 0 --rounds 1 \
    --contenders deepfm,deepfm-fp32,deepctr --timeout 400 --results "$OUT/RESULTS-cuda.md" 2>&1 | tail -20
STEM="bench/.data/g${ROWS}s7"
echo "== deepfm at batch 32768 (beyond the shared protocol: what the GPU gives a bigger batch)"
"$PY" bench/run_deepfm.py --train "${STEM}_train.tsv" --test "${STEM}_test.tsv" --device "$DEVICE" \
    --batch-size 32768 --name deepfm-b32768 --json-out bench/.out/results.jsonl 2>>bench/.out/deepfm-b32768.err | tail -1
cat "$OUT/RESULTS-cuda.md"
fi
if want amx; then
# two logical CPUs on different physical cores where the topology says so
SIB=$(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list 2>/dev/null || echo 0)
CPU2=$(for c in /sys/devices/system/cpu/cpu[0-9]*; do n=${c##*cpu}; case ",$SIB," in *",$n,"*) ;; *) echo "$n"; break;; esac; done)
CPUS="0,${CPU2:-1}"; PIN=""; command -v taskset >/dev/null && PIN="taskset -c $CPUS"
echo "== CPU benchmark on 2 logical CPUs ($CPUS; cpu0 siblings: $SIB) of this host" | tee -a "$OUT/log.txt"
lscpu 2>/dev/null | grep -E "Model name|Thread|Core|Flags" | cut -c1-200 >> "$OUT/log.txt"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 POLARS_MAX_THREADS=2 $PIN "$PY" bench/run_all.py --rows 250000 \
    --skip-setup --device cpu --threads 2 --quiet-wait 0 --rounds 1 --contenders deepfm,deepfm-fp32,deepctr --timeout 300 \
    --results "$OUT/RESULTS-amx.md" 2>&1 | tail -8
cat "$OUT/RESULTS-amx.md"
fi
cp bench/.out/results.jsonl "$OUT/results.jsonl" 2>/dev/null
for f in bench/.out/*.err; do echo "== $f"; tail -8 "$f"; done > "$OUT/errs.txt"
