#!/usr/bin/env bash
# The device run, prepared here and run on a bare GPU machine (PyTorch with CUDA, onnx, maybe no
# package registry): the gpu-marked tests, then benchmarks/gpu_bench.py on every engine present,
# results in benchmarks/results/*-gpu.{md,json} (and copied to $OUT when set). Under 8 minutes.
#
#   benchmarks/gpu.sh --prepare [DIR] [--python X.Y]...  # here, with a registry: wheels + test data into DIR
#   benchmarks/gpu.sh [--wheelhouse DIR] [--budget S]    # there: install what is missing from DIR, test, bench
#   benchmarks/gpu.sh --cpu-dry-run [--wheelhouse DIR]   # here: the same steps on the CPU, tiny models
#
# DIR defaults to benchmarks/wheelhouse (ignored by git: give it to the device run as a carried path).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
HOUSE="$ROOT/benchmarks/wheelhouse"
MODE=run
BUDGET=240
VERSIONS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepare) MODE=prepare; if [[ $# -gt 1 && "$2" != --* ]]; then HOUSE="$(realpath -m "$2")"; shift; fi ;;
    --wheelhouse) HOUSE="$(realpath -m "$2")"; shift ;;
    --python) VERSIONS+=("$2"); shift ;;
    --budget) BUDGET="$2"; shift ;;
    --cpu-dry-run) MODE=dry ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
die() { echo "error: $*" >&2; exit 1; }
say() { echo "== $*"; }

# What the tests and the benchmark import beyond PyTorch (which brings numpy, networkx) and onnx
# (module=distribution). Installed with --no-deps, so every needed dependency is listed; scikit-image
# is used for its metrics only, which need neither pillow, imageio nor tifffile (14 MB left out:
# the wheelhouse travels within 60 MB, of which scipy is 35).
NEEDED=(h5py=h5py safetensors=safetensors torch_pruning=torch-pruning==1.6.1 scipy=scipy skimage=scikit-image
        lazy_loader=lazy-loader packaging=packaging pytest=pytest pluggy=pluggy iniconfig=iniconfig)

if [[ "$MODE" == prepare ]]; then
  [[ ${#VERSIONS[@]} -gt 0 ]] || VERSIONS=("$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')")
  mkdir -p "$HOUSE"
  say "test data: the embedded test split, 1 volume x 2 slices (160x160, 8 coils)"
  [[ -d "$HOUSE/data" ]] || OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_bench.py --make-data "$HOUSE/data" --slices 2 --volumes 1
  [[ -d "$HOUSE/data-tiny" ]] || OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_bench.py --make-data "$HOUSE/data-tiny" --slices 2 --volumes 1 --size 32
  for v in "${VERSIONS[@]}"; do
    say "wheels for CPython $v (manylinux x86_64)"
    dists=()
    for pair in "${NEEDED[@]}"; do dists+=("${pair#*=}"); done
    extra=()
    [[ "$v" == 3.10 ]] && extra=(exceptiongroup tomli)  # pytest's back-ports before 3.11
    "$PY" -m pip download -q --only-binary=:all: --no-deps --implementation cp --python-version "$v" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --dest "$HOUSE/py$v" "${dists[@]}" "${extra[@]}"
  done
  size=$(du -sm "$HOUSE" | cut -f1)
  say "wheelhouse $HOUSE: ${size} MB"
  (( size <= 60 )) || echo "warning: ${size} MB: over the 60 MB a device run carries; prepare fewer Python versions" >&2
  exit 0
fi

# -- on the device (or the CPU dry run) ---------------------------------------------------------
"$PY" -c 'import torch' 2>/dev/null || die "PyTorch is not importable by $PY (set PYTHON=...)"
PYV=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ "$MODE" == run ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "no CUDA GPU visible to PyTorch $("$PY" -c 'import torch; print(torch.__version__)') (use --cpu-dry-run on a CPU)"
fi
SITE="$ROOT/benchmarks/.gpu-site"  # missing packages go here, not into the machine's Python
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing() {
  local out=()
  for pair in "${NEEDED[@]}"; do
    "$PY" -c "import ${pair%%=*}" 2>/dev/null || out+=("${pair#*=}")
  done
  echo "${out[@]:-}"
}
todo=$(missing)
if [[ -n "$todo" ]]; then
  say "installing from $HOUSE/py$PYV: $todo"
  [[ -d "$HOUSE/py$PYV" ]] || die "missing $todo and no wheels for Python $PYV in $HOUSE (prepare with: benchmarks/gpu.sh --prepare --python $PYV)"
  wheels=()
  for dist in $todo; do
    name="${dist%%==*}"; pat="$(echo "$name" | tr '-' '_')"
    w=$(ls "$HOUSE/py$PYV"/* 2>/dev/null | grep -i "/${pat}-[0-9]" | head -1 || true)
    [[ -n "$w" ]] && wheels+=("$w")
  done
  [[ "$PYV" == 3.10 ]] && wheels+=($(ls "$HOUSE/py$PYV"/{exceptiongroup,tomli}-* 2>/dev/null || true))
  [[ ${#wheels[@]} -gt 0 ]] && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
  todo=$(missing)
  [[ -z "$todo" ]] || die "still missing for Python $PYV: $todo (no wheel in $HOUSE/py$PYV; prepare with --python $PYV)"
fi
"$PY" -c 'import spade_deploy.bench, spade_deploy.deploy.runtime' || die "spade_deploy does not import (see above)"

RESULTS="$ROOT/benchmarks/results"
if [[ "$MODE" == dry ]]; then
  DATA="$HOUSE/data-tiny"; RESULTS="$(mktemp -d)"; DRY=(--cpu-dry-run); TESTS=(tests/test_gpu.py tests/test_device.py)
else
  DATA="$HOUSE/data"; DRY=(); TESTS=(tests/test_gpu.py tests/test_export.py)
fi
[[ -d "$DATA" ]] || die "no test data in $DATA (benchmarks/gpu.sh --prepare makes it)"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| Python', '$PYV')"
LOG="$(mktemp -d)"

say "tests (${TESTS[*]})"
set +e
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" -s 2>&1 | tee "$LOG/tests.txt" | tail -40
test_rc=${PIPESTATUS[0]}
set -e
say "tests exit status $test_rc"

say "benchmark (budget ${BUDGET} s)"
set +e
timeout $((BUDGET + 60)) "$PY" benchmarks/gpu_bench.py --data "$DATA" --out "$RESULTS" --budget "$BUDGET" "${DRY[@]}" 2>&1 | tee "$LOG/bench.txt" | tail -30
bench_rc=${PIPESTATUS[0]}
set -e
say "benchmark exit status $bench_rc; results in $RESULTS"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results"
  cp "$RESULTS"/*-gpu.* "$RESULTS"/*-cpu-dry-run.* "$OUT/results/" 2>/dev/null || true
  cp "$LOG"/*.txt "$OUT/"
fi
[[ $test_rc -eq 0 && $bench_rc -eq 0 ]] || exit 1
