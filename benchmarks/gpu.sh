#!/usr/bin/env bash
# The device run, prepared here and run on a bare GPU machine (Python 3.12, PyTorch with CUDA,
# numpy, onnx, CPU onnxruntime, h5py, scipy, scikit-image, pytest ...; no registry, no sigpy): the
# GPU tests, then benchmarks/gpu_bench.py on every engine present, all results in at most 8 files
# (in benchmarks/results, copied to $OUT when set). Bounded by its time limits to 7 minutes.
#
#   benchmarks/gpu.sh --prepare [DIR] [--python X.Y]...  # here, with a registry: wheels, test data, coil maps into DIR
#   benchmarks/gpu.sh [--wheelhouse DIR] [--budget S]    # there: install what is missing from DIR, test, bench
#   benchmarks/gpu.sh --cpu-dry-run [--wheelhouse DIR]   # here: the same steps on the CPU, tiny models
#
# DIR defaults to benchmarks/wheelhouse (ignored by git: give it to the device run as a carried path).
# --python defaults to the device's Python (3.12). benchmarks/emulate_device.sh runs the whole
# thing in a copy of the device's Python environment on this CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
HOUSE="$ROOT/benchmarks/wheelhouse"
DEVICE_PYTHON=3.12
CARRY_LIMIT_MB=64  # what the device run carries in: the working tree and the wheelhouse together
MODE=run
BUDGET=  # seconds of benchmark: 240 on the device, 300 in the dry run
TESTS_LIMIT=120
VERSIONS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepare) MODE=prepare; if [[ $# -gt 1 && "$2" != --* ]]; then HOUSE="$(realpath -m "$2")"; shift; fi ;;
    --wheelhouse) [[ $# -gt 1 ]] || { echo "error: --wheelhouse needs a folder" >&2; exit 1; }; HOUSE="$(realpath -m "$2")"; shift ;;
    --python) [[ $# -gt 1 ]] || { echo "error: --python needs a version (3.12)" >&2; exit 1; }; VERSIONS+=("$2"); shift ;;
    --budget) [[ $# -gt 1 && "$2" =~ ^[0-9]+$ ]] || { echo "error: --budget needs whole seconds" >&2; exit 1; }; BUDGET="$2"; shift ;;
    --cpu-dry-run) MODE=dry ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
die() { echo "error: $*" >&2; exit 1; }
say() { echo "== $*"; }

# What the tests and the benchmark import (module=distribution). CARRIED: what the device lacks,
# carried as wheels (torch-pruning, ismrmrd (the MRI task reads ISMRMRD raw files) and its xsdata are
# pure Python; what they need, torch, numpy, h5py and typing-extensions, is there). PRESENT:
# what the device has (benchmarks/device-packages.txt), checked, never carried. sigpy is neither:
# the coil maps the run needs are computed here and carried (DIR/maps).
CARRIED=(torch_pruning=torch-pruning==1.6.1 ismrmrd=ismrmrd==1.15.0 xsdata=xsdata)
PRESENT=(numpy=numpy onnx=onnx h5py=h5py safetensors=safetensors scipy=scipy skimage=scikit-image
         pytest=pytest typer=typer rich=rich matplotlib=matplotlib)

if [[ "$MODE" == prepare ]]; then
  [[ ${#VERSIONS[@]} -gt 0 ]] || VERSIONS=("$DEVICE_PYTHON")
  mkdir -p "$HOUSE"
  say "test data: the embedded test split, 1 volume x 2 slices (160x160, 8 coils)"
  [[ -d "$HOUSE/data" ]] || OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_bench.py --make-data "$HOUSE/data" --slices 2 --volumes 1
  say "coil maps of the test data (ESPIRiT, sigpy here; the device has no sigpy)"
  OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_bench.py --make-maps --data "$HOUSE/data" --maps "$HOUSE/maps"
  for v in "${VERSIONS[@]}"; do
    say "wheels for CPython $v (manylinux x86_64): ${CARRIED[*]#*=}"
    dists=()
    for pair in "${CARRIED[@]}"; do dists+=("${pair#*=}"); done
    "$PY" -m pip download -q --only-binary=:all: --no-deps --implementation cp --python-version "$v" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --dest "$HOUSE/py$v" "${dists[@]}"
  done
  house_kb=$(du -sk "$HOUSE" | cut -f1)
  tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  total_mb=$(( (house_kb + tree_kb + 1023) / 1024 ))
  say "wheelhouse $HOUSE: $(( (house_kb + 1023) / 1024 )) MB; with the working tree ($(( (tree_kb + 1023) / 1024 )) MB) ${total_mb} of the ${CARRY_LIMIT_MB} MiB a device run carries"
  (( total_mb <= CARRY_LIMIT_MB )) || die "${total_mb} MB: over the ${CARRY_LIMIT_MB} MiB a device run carries"
  exit 0
fi

# -- on the device (or the CPU dry run) ---------------------------------------------------------
T0=$SECONDS
"$PY" -c 'import torch' 2>/dev/null || die "PyTorch is not importable by $PY (set PYTHON=...)"
PYV=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [[ "$MODE" == run ]]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "no CUDA GPU visible to PyTorch $("$PY" -c 'import torch; print(torch.__version__)') (use --cpu-dry-run on a CPU)"
fi
[[ -d "$HOUSE/data" && -d "$HOUSE/maps/espirit" ]] || die "no test data or coil maps in $HOUSE (benchmarks/gpu.sh --prepare makes them)"
SITE="$ROOT/benchmarks/.gpu-site"  # carried packages go here, not into the machine's Python
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing() {  # the distributions of the module=distribution pairs whose module does not import
  "$PY" - "$@" <<'EOF'
import importlib, sys
out = []
for pair in sys.argv[1:]:
    module, dist = pair.split("=", 1)
    try:
        importlib.import_module(module)
    except Exception:
        out.append(dist)
print(" ".join(out))
EOF
}
absent=$(missing "${PRESENT[@]}")
[[ -z "$absent" ]] || die "this machine's Python lacks $absent, which the device is known to have (benchmarks/device-packages.txt): carry it as a wheel"
todo=$(missing "${CARRIED[@]}")
if [[ -n "$todo" ]]; then
  say "installing from $HOUSE/py$PYV: $todo"
  [[ -d "$HOUSE/py$PYV" ]] || die "missing $todo and no wheels for Python $PYV in $HOUSE (prepare with: benchmarks/gpu.sh --prepare --python $PYV)"
  wheels=()
  for dist in $todo; do
    name="${dist%%==*}"; pat="$(echo "$name" | tr '-' '_')"
    w=$(ls "$HOUSE/py$PYV"/* 2>/dev/null | grep -i "/${pat}-[0-9]" | head -1 || true)
    [[ -n "$w" ]] && wheels+=("$w")
  done
  [[ ${#wheels[@]} -gt 0 ]] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
  todo=$(missing "${CARRIED[@]}")
  [[ -z "$todo" ]] || die "still missing for Python $PYV: $todo (no wheel in $HOUSE/py$PYV; prepare with --python $PYV)"
fi
"$PY" -c 'import spade_deploy.bench, spade_deploy.deploy.runtime, spade_deploy.prune' || die "spade_deploy does not import (see above)"

# Nothing is written into the user's cache: coil maps come from $HOUSE/maps only, compile caches are temporary.
SCRATCH="$(mktemp -d)"
export XDG_CACHE_HOME="$SCRATCH/cache" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor"
if [[ "$MODE" == dry ]]; then
  RESULTS="$SCRATCH/results"; DRY=(--cpu-dry-run --repeats 2); NAME=cpu-dry-run; BUDGET=${BUDGET:-300}
  export SPADE_GPU_CPU_DRY_RUN=1  # tests/test_gpu.py runs its CPU-runnable bodies on the CPU
else
  RESULTS="$ROOT/benchmarks/results"; DRY=(); NAME=gpu; BUDGET=${BUDGET:-240}
fi
TESTS=(tests/test_gpu.py tests/test_export.py tests/test_compile.py)
mkdir -p "$RESULTS"
ENV_TXT="$SCRATCH/$NAME-env.txt"
{
  "$PY" -c "import sys, torch, numpy; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| numpy', numpy.__version__, '| Python', sys.version.split()[0])"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi: not here"
  echo "carried: $(ls "$SITE" 2>/dev/null | grep -v dist-info | tr '\n' ' ')"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|onnx|onnxruntime|onnxruntime-gpu|tensorrt|triton|h5py|safetensors|scipy|scikit-image|pytest|typer|rich|matplotlib) ' || true
} > "$ENV_TXT" 2>&1
cat "$ENV_TXT"

say "tests (${TESTS[*]}; at most ${TESTS_LIMIT} s)"
set +e
timeout "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" -s > "$SCRATCH/$NAME-tests.txt" 2>&1
test_rc=$?
set -e
tail -25 "$SCRATCH/$NAME-tests.txt"
say "tests exit status $test_rc"

# The bench's own budget shares the time between the models; the hard limit only catches a hang
# (results are rewritten after each model, so what was measured survives it).
say "benchmark (budget ${BUDGET} s, stopped at $((BUDGET + 60)) s)"
set +e
timeout $((BUDGET + 60)) "$PY" benchmarks/gpu_bench.py --data "$HOUSE/data" --maps "$HOUSE/maps" --out "$RESULTS" \
  --budget "$BUDGET" "${DRY[@]}" > "$SCRATCH/$NAME-bench.txt" 2>&1
bench_rc=$?
set -e
tail -30 "$SCRATCH/$NAME-bench.txt"
say "benchmark exit status $bench_rc; results in $RESULTS/$NAME.{md,json}"
files=("$RESULTS/$NAME.md" "$RESULTS/$NAME.json" "$SCRATCH/$NAME-tests.txt" "$SCRATCH/$NAME-bench.txt" "$ENV_TXT")
for f in "${files[@]:0:2}"; do [[ -f "$f" ]] || { echo "error: $f was not written" >&2; bench_rc=1; }; done
if [[ -n "${OUT:-}" ]]; then  # at most 8 files come back from a device run: these 5
  mkdir -p "$OUT"
  for f in "${files[@]}"; do [[ -f "$f" ]] && cp "$f" "$OUT/"; done
  say "$(ls "$OUT" | wc -l) files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
say "done in $((SECONDS - T0)) s"
[[ $test_rc -eq 0 && $bench_rc -eq 0 ]] || exit 1
