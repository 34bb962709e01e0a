#!/usr/bin/env bash
# The device run, emulated on this CPU machine before a GPU is ever used:
#   1. a Python 3.12 virtual environment in .emulate/venv (ignored by git) with the GPU machine's
#      packages at its versions where PyPI has them (benchmarks/device-packages.txt; torch 2.11.0 is
#      PyPI's CUDA build, the device's own, which needs its nvidia-* libraries to import even on a
#      CPU); anything pip adds that the device lacks is removed again, and torch-pruning, sigpy,
#      PyWavelets, fastmri, nilearn, TensorRT and onnxruntime-gpu must be absent;
#   2. benchmarks/gpu.sh --prepare, as for the device (the project's .venv: `make setup`);
#   3. a copy of what a device run receives (tracked and untracked-not-ignored files, and the
#      wheelhouse as the carried path), checked against the 64 MiB a device run carries;
#   4. benchmarks/gpu.sh --cpu-dry-run in that copy with the emulated Python as `python3`, HOME and
#      TMPDIR empty, OUT set: the device's steps, tests and packages on the CPU;
#   5. the distributions every Python process of it imported (benchmarks/emulate_audit.py): any the
#      device lacks, other than the carried ones, fails the emulation.
# Report in .emulate/report.md. Not run by CI (it downloads about 3 GB once).
#
#   benchmarks/emulate_device.sh [--python PATH] [--rebuild]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EMU="$ROOT/.emulate"
VENV="$EMU/venv"
PY312="${EMULATE_PYTHON:-}"
REBUILD=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) [[ $# -gt 1 ]] || { echo "error: --python needs a path" >&2; exit 1; }; PY312="$2"; shift ;;
    --rebuild) REBUILD=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
die() { echo "error: $*" >&2; exit 1; }
say() { echo "== $*"; }
T_ALL=$SECONDS

# The device's packages, pinned where its versions are known (the rest: PyPI's newest for cp312).
# Only those the device run can touch: the image's other ~180 (jax, transformers, ...) are not imported.
REQUIREMENTS=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 onnx==1.23.1 onnx-ir==1.0.0 onnxscript==0.7.2
              onnxruntime==1.30.0 safetensors==0.8.0 h5py scipy scikit-image pytest typer rich matplotlib
              pillow tqdm)
NOT_THERE=(torch_pruning ismrmrd xsdata pydicom sigpy pywt fastmri nilearn tensorrt)

is312() { [[ -x "$1" ]] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' 2>/dev/null; }
if [[ -z "$PY312" ]]; then
  for c in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
           /usr/bin/python3.12 /usr/local/bin/python3.12 "$(command -v python3 || true)"; do
    if [[ -n "$c" ]] && is312 "$c"; then PY312="$c"; break; fi
  done
fi
[[ -n "$PY312" ]] || die "no Python 3.12 found (the device's is 3.12.3): install one (pyenv install 3.12, apt-get install python3.12) or pass --python PATH"
is312 "$PY312" || die "$PY312 is not a Python 3.12"
HOST_PY="$ROOT/.venv/bin/python"
[[ -x "$HOST_PY" ]] || die "no project environment in .venv (make setup): gpu.sh --prepare runs there (sigpy, nilearn)"
say "Python for the emulated device: $PY312 ($("$PY312" -c 'import sys; print(sys.version.split()[0])'); the device's: 3.12.3)"

# -- 1. the environment ---------------------------------------------------------------------------
T=$SECONDS
stamp="$PY312 ${REQUIREMENTS[*]} $(sha256sum benchmarks/device-packages.txt | cut -c1-16)"
if [[ $REBUILD -eq 1 || ! -f "$VENV/.stamp" || "$(cat "$VENV/.stamp")" != "$stamp" ]]; then
  say "building $VENV (torch 2.11.0 with its CUDA libraries: about 3 GB to download, 4.7 GB installed)"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQUIREMENTS[@]}" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  extra=$("$VENV/bin/python" -I - "$ROOT/benchmarks/device-packages.txt" <<'EOF'
import sys
from importlib.metadata import distributions
norm = lambda n: n.lower().replace("_", "-").replace(".", "-")
device = {norm(l.split("#")[0].strip().split("==")[0]) for l in open(sys.argv[1]) if l.split("#")[0].strip()}
print(" ".join(sorted({d.metadata["Name"] for d in distributions() if norm(d.metadata["Name"]) not in device})))
EOF
)
  if [[ -n "$extra" ]]; then
    say "removing what pip added that the device lacks: $extra"
    "$VENV/bin/python" -m pip uninstall -q -y $extra
  fi
  echo "$stamp" > "$VENV/.stamp"
else
  say "reusing $VENV (--rebuild to build it afresh)"
fi
for m in "${NOT_THERE[@]}"; do
  ! "$VENV/bin/python" -c "import $m" 2>/dev/null || die "$m is importable in $VENV, but the device lacks it"
done
! "$VENV/bin/python" -c 'import onnxruntime, sys; sys.exit(0 if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else 1)' \
  || die "onnxruntime-gpu in $VENV, but the device has the CPU onnxruntime"
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | tail -n +3 > "$EMU/pip-list.txt"
T_ENV=$((SECONDS - T))
say "environment: $(wc -l < "$EMU/pip-list.txt") distributions, $(du -sh "$VENV" | cut -f1), ${T_ENV} s"

# -- 2. prepare, as for the device ----------------------------------------------------------------
T=$SECONDS
HOUSE="$ROOT/benchmarks/wheelhouse"
PYTHON="$HOST_PY" benchmarks/gpu.sh --prepare "$HOUSE"
T_PREP=$((SECONDS - T))

# -- 3. what a device run receives ----------------------------------------------------------------
TREE="$EMU/tree"
rm -rf "$TREE" "$EMU/home" "$EMU/tmp" "$EMU/out" "$EMU/audit" "$EMU/hook"
mkdir -p "$TREE" "$EMU/home" "$EMU/tmp" "$EMU/out" "$EMU/audit" "$EMU/hook"
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
  [[ -e "$f" ]] && { mkdir -p "$TREE/$(dirname "$f")"; cp -p "$f" "$TREE/$f"; }
done
mkdir -p "$TREE/benchmarks"
cp -rp "$HOUSE" "$TREE/benchmarks/wheelhouse"
CARRIED_MB=$(( ($(du -sk "$TREE" | cut -f1) + 1023) / 1024 ))
say "the tree and the wheelhouse a device run receives: ${CARRIED_MB} MB (limit 64 MiB)"
(( CARRIED_MB <= 64 )) || die "${CARRIED_MB} MB: over the 64 MiB a device run carries"

# -- 4. the device run, on the CPU ----------------------------------------------------------------
cat > "$EMU/hook/sitecustomize.py" <<EOF
import sys
sys.path.insert(0, "$TREE/benchmarks")
import emulate_audit
emulate_audit.install()
EOF
T=$SECONDS
set +e
(cd "$TREE" && env -i PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" HOME="$EMU/home" TMPDIR="$EMU/tmp" \
   LANG=C.UTF-8 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OUT="$EMU/out" PYTHONPATH="$EMU/hook" \
   SPADE_EMULATE_AUDIT="$EMU/audit" bash benchmarks/gpu.sh --cpu-dry-run) 2>&1 | tee "$EMU/run.txt"
RUN_RC=${PIPESTATUS[0]}
set -e
T_RUN=$((SECONDS - T))

# -- 5. what it imported --------------------------------------------------------------------------
set +e
"$VENV/bin/python" "$TREE/benchmarks/emulate_audit.py" "$EMU/audit" "$TREE" > "$EMU/audit.txt" 2>&1
AUDIT_RC=$?
set -e
cat "$EMU/audit.txt"
# every engine that can run on a CPU ran: none failed, none left out for time
ENGINES_RC=0
"$VENV/bin/python" - "$EMU/out/cpu-dry-run.json" >> "$EMU/audit.txt" 2>&1 <<'EOF' || ENGINES_RC=1
import json, sys
families = json.load(open(sys.argv[1]))["families"]
bad = [f"{f} {e}: {s}" for f, r in families.items() for e, s in r["engines"].items()
       if s.startswith(("failed", "not run"))]
print(f"bench: {len(families)} models; engines failed or not run: {'; '.join(bad) or 'none'}")
sys.exit(1 if bad or len(families) != 4 else 0)
EOF
tail -1 "$EMU/audit.txt"
OUT_FILES=$(ls "$EMU/out" | wc -l)
HOME_LEFT=$(find "$EMU/home" -mindepth 1 | wc -l)
{
  echo "# Device emulation, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' + local changes')"
  echo
  echo "- Python: $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])') ($PY312); the device's 3.12.3"
  echo "- packages: $(grep -iE '^(torch|numpy|onnx|onnxruntime|h5py|scipy|scikit-image|safetensors|pytest|typer|rich|matplotlib) ' "$EMU/pip-list.txt" | awk '{printf "%s %s, ", $1, $2}' | sed 's/, $//')"
  echo "- environment ${T_ENV} s, prepare ${T_PREP} s, device run (gpu.sh --cpu-dry-run) ${T_RUN} s, all $((SECONDS - T_ALL)) s"
  echo "- carried: ${CARRIED_MB} MB of 64 MiB; files back in \$OUT: ${OUT_FILES} of 8 ($(ls "$EMU/out" | tr '\n' ' '))"
  echo "- gpu.sh exit status ${RUN_RC}; audit exit status ${AUDIT_RC}; engines check ${ENGINES_RC}; files left in HOME: ${HOME_LEFT}"
  echo
  echo '```'
  cat "$EMU/audit.txt"
  echo '```'
} > "$EMU/report.md"
say "report: $EMU/report.md"
cat "$EMU/report.md"
[[ $RUN_RC -eq 0 && $AUDIT_RC -eq 0 && $ENGINES_RC -eq 0 && $OUT_FILES -le 8 && $OUT_FILES -ge 5 ]]
