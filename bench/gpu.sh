#!/usr/bin/env bash
# ichdet on a GPU: throughput (bf16+channels_last vs fp32), ichdet's train step and inference vs bare
# timm, whether the data loader keeps the GPU busy, and one sequence-stage epoch at RSNA scale. Sized to finish within 10 minutes on an H100
# (not yet run on one); results printed and written to "${OUT:-bench_out}/gpu.json". The Python is
# bench/gpu_bench.py (see its docstring).
#
#   bash bench/gpu.sh                       # from the repository root, on the GPU machine
#   ICHDET_GPU_SMOKE=1 bash bench/gpu.sh    # every section with tiny sizes (CPU is fine): a quick check
#
# Which Python: $ICHDET_PY if set; else .venv/bin/python if it imports torch with CUDA (smoke: any
# torch); else a python3 that does (the GPU image's own torch), with src/ on PYTHONPATH and, when
# ichdet's own dependencies (pydantic, pydicom, albumentations, ...) are missing there, wheels from
# .whl/ installed into a temporary folder (no network needed); failing that, a virtual environment
# that reuses python3's torch: `python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e .`
# (needs the package index). The bare-timm sections run even where ichdet cannot be imported.
# The lent H100/H200 image (python 3.12, torch, timm, opencv, pandas, pyarrow, sklearn, safetensors,
# tensorboard, pyyaml, tqdm; no network) lacks exactly: pydantic, pydantic-core, annotated-types,
# typing-inspection, pydicom, albumentations, albucore, stringzilla, simsimd -> carry them as cp312
# manylinux x86_64 wheels in .whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 ...).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-bench_out}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
SMOKE="${ICHDET_GPU_SMOKE:-0}"
START=$(date +%s)

torch_ok() {  # $1 = python: imports torch + timm, and CUDA works unless this is the smoke run
    "$1" -c "import sys, torch, timm; sys.exit(0 if '$SMOKE' == '1' or torch.cuda.is_available() else 1)" \
        >/dev/null 2>&1
}
ichdet_ok() {  # $1 = python: ichdet's training module imports (with the PYTHONPATH in force)
    "$1" -c "import ichdet.train" >/dev/null 2>&1
}

PY=""
if [ -n "${ICHDET_PY:-}" ]; then
    PY="$ICHDET_PY"; echo "python: \$ICHDET_PY = $PY"
elif [ -x .venv/bin/python ] && torch_ok .venv/bin/python; then
    PY=.venv/bin/python; echo "python: existing .venv"
else
    SYS=$(command -v python3 || true)
    if [ -n "$SYS" ] && torch_ok "$SYS"; then
        PY="$SYS"; echo "python: $SYS (its own torch; .venv missing or without CUDA torch)"
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
        if ! ichdet_ok "$PY"; then
            if ls .whl/*.whl >/dev/null 2>&1; then
                SITE=$(mktemp -d /tmp/ichdet-site.XXXXXX)
                echo "ichdet's dependencies missing: installing .whl/*.whl into $SITE (no index)"
                "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
                    && export PYTHONPATH="$PYTHONPATH:$SITE"
            fi
        fi
        if ! ichdet_ok "$PY"; then
            VENV=.venv; [ -e .venv ] && VENV=.venv-gpu
            echo "ichdet not importable with $SYS: trying $SYS -m venv --system-site-packages $VENV + pip install -e ."
            if "$SYS" -m venv --system-site-packages "$VENV" \
                && timeout 120 "$VENV/bin/pip" install -q --retries 1 --timeout 15 -e . \
                && torch_ok "$VENV/bin/python"; then
                PY="$VENV/bin/python"; echo "python: new $VENV"
            else
                echo "WARNING: could not install ichdet's dependencies (offline?): the ichdet sections will fail," \
                     "the bare-timm sections still run. Carry cp312 wheels in .whl/ to fix (see the script's header)."
            fi
        fi
    else
        echo "no python with torch (with CUDA unless smoke) found: creating .venv (needs the package index)"
        python3 -m venv .venv && .venv/bin/pip install -q -e . || { echo "venv creation failed"; exit 1; }
        PY=.venv/bin/python
    fi
fi
"$PY" -c "import sys, torch; print('using', sys.executable, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if ichdet_ok "$PY"; then echo "ichdet: importable"; else echo "ichdet: NOT importable (ichdet sections will fail)"; fi

# the sequence stage (issue 10): one epoch of the sequence model over RSNA-scale random features
# (752,803 slices, 21,700 series, 2048+6 wide) on the GPU; at most 150 s, before the budget is set
SEQ_ARGS=(cost --device cuda --out "$OUT_DIR/seq_cost.json")
[ "$SMOKE" = 1 ] && SEQ_ARGS=(cost --device cpu --series 60 --slices 2400 --out "$OUT_DIR/seq_cost.json")
echo "sequence stage: bench/bench_seq.py ${SEQ_ARGS[*]}"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" timeout 150 "$PY" bench/bench_seq.py "${SEQ_ARGS[@]}" \
    | tail -n 25 || echo "sequence stage: failed or over 150 s (see above)"

# whatever the setup took comes off the 10 minutes: sections that would end past ~9.5 min are skipped
BUDGET=$(( ${ICHDET_GPU_BUDGET_S:-570} - ($(date +%s) - START) ))
ARGS=(--out "$OUT_DIR/gpu.json" --budget-s "$BUDGET")
[ "$SMOKE" = 1 ] && ARGS+=(--smoke)
"$PY" bench/gpu_bench.py "${ARGS[@]}" "$@"
RC=$?
echo "gpu.sh: done in $(( $(date +%s) - START )) s, exit $RC; results in $OUT_DIR/gpu.json"
exit $RC
