#!/usr/bin/env bash
# The GPU check: on a CUDA machine, the tests that matter for devices and dtypes, the headline benchmarks in
# float32 and bfloat16 (every benchmarks/*.py --quick, epo_cost.py at the paper's sizes, fluency.py --quick),
# then the whole test suite on the GPU; prints each step's last lines and writes them to $OUT/summary.md,
# the figures the README records. Not run on CPU-only machines (it stops at once there).
#
#   scripts/gpu_check.sh                 # everything, most informative first
#   STEPS="tests_gpu epo_cost" scripts/gpu_check.sh    # only these steps (names below)
#   OUT=/tmp/gpu STEP_TIMEOUT=300 scripts/gpu_check.sh
#
# Needs the environment `make install` builds (.venv with the dev and ray extras and the data wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
TAIL=${TAIL:-8}
STEPS=${STEPS:-"info tests_gpu epo_cost fluency quick_benchmarks tests_all"}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DREAMLENS_DEVICE=cuda
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device here (torch sees none): the GPU check needs one" >&2
    exit 2
fi

failed=0
# step NAME DTYPE COMMAND...: run it under a timeout with DREAMLENS_DTYPE=DTYPE, log to $OUT/NAME.log, print its tail
step() {
    local name=$1 dtype=$2
    shift 2
    local log="$OUT/$name.log" t0 rc
    t0=$(date +%s)
    DREAMLENS_DTYPE=$dtype timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    {
        echo "### $name ($dtype): exit $rc, $(( $(date +%s) - t0 )) s"
        echo '```'
        echo "$*"
        tail -n "$TAIL" "$log"
        echo '```'
    } | tee -a "$SUMMARY"
}

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

: >"$SUMMARY"
if wanted info; then
    step info float32 "$PY" -c "
import torch, dreamlens as dl
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
m = dl.load_model()
print('embedded model on', m.cfg.device, m.cfg.dtype)"
fi
# the tests of devices, dtypes (bfloat16 included: test_devices.py), settings and batching; their models land on
# the GPU by default. In float32: the suite's tolerances are float32's.
wanted tests_gpu && step tests_gpu float32 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_devices.py tests/test_model_settings.py tests/test_speed.py tests/test_epo.py tests/test_sae.py
for dtype in float32 bfloat16; do
    # the headline cost of one EPO iteration at the paper's sizes, on the embedded model
    wanted epo_cost && step "epo_cost_$dtype" "$dtype" "$PY" benchmarks/epo_cost.py
    # the fluency headline (dreams vs the dataset), its quick path
    wanted fluency && step "fluency_$dtype" "$dtype" "$PY" benchmarks/fluency.py --quick --out "$OUT/fluency_$dtype"
    if wanted quick_benchmarks; then
        step "epo_cost_quick_$dtype" "$dtype" "$PY" benchmarks/epo_cost.py --quick
        step "many_features_$dtype" "$dtype" "$PY" benchmarks/many_features.py --quick
        step "scan_throughput_$dtype" "$dtype" "$PY" benchmarks/scan_throughput.py --quick
        step "modes_$dtype" "$dtype" "$PY" benchmarks/modes.py --quick --out "$OUT/modes_$dtype"
        step "tuning_$dtype" "$dtype" "$PY" benchmarks/tuning.py --quick --out "$OUT/tuning_$dtype.json"
        step "sweep_$dtype" "$dtype" "$PY" benchmarks/sweep.py --quick
    fi
done
# the whole suite on the GPU, in float32 (its tolerances are float32's; bfloat16 has its own tests above)
wanted tests_all && step tests_all float32 "$PY" -m pytest -q -p no:cacheprovider

echo "summary: $SUMMARY"
exit "$failed"
