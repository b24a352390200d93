#!/usr/bin/env bash
# flowsolve's GPU checks in one run: the CUDA tests, then every benchmark on the GPU, ordered
# by value, each step under `timeout` and all of them inside one overall budget, logs in $OUT.
#
# On the device machine (kind nvidia-h200, no network, root), from the repo root, with the
# wheels of benchmarks/fetch_wheels.sh carried:
#     device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
# Here, on a CPU-only machine, the same plumbing with tiny sizes (proves the script):
#     OUT=/tmp/gpu_out PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run
#
# Variables: DEVICE (cuda; --dry-run sets cpu), PYTHON (python3), OUT (the device tool's
# folder; default /tmp/gpu_check_out), WHEELS (.whl), EXTRA_WHEELS (a second folder, for a dry
# run whose Python lacks what the device image has, e.g. tqdm), SITE (/tmp/site; dry run
# /tmp/gpu_check_site), BUDGET (450: seconds for the whole script; a step gets at most what
# is left, a step with under 10 s left is skipped).
#
# $OUT gets 8 files (the device tool returns at most 8): summary.txt (steps, status, times
# and the key figures; also printed last) and env.log, tests.log, likelihood.log,
# sampling.log, divergence.log, ot.log (couplings, training, torchcfm), sde.log.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.." || exit 2
ROOT=$PWD

DRY=0 INTERNAL=
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
                   exit 0 ;;
        __install|__env) INTERNAL=$arg ;;  # the script calling itself under timeout
        *) echo "unknown argument: $arg (accepted: --dry-run)" >&2; exit 2 ;;
    esac
done
DEVICE=${DEVICE:-cuda}
[ "$DRY" = 1 ] && DEVICE=cpu
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WHEELS=${WHEELS:-.whl}
if [ "$DEVICE" = cpu ]; then SITE=${SITE:-/tmp/gpu_check_site}; else SITE=${SITE:-/tmp/site}; fi
BUDGET=${BUDGET:-450}
RESERVE=5  # seconds kept for the summary

export DEVICE PYTHON OUT WHEELS SITE BUDGET EXTRA_WHEELS=${EXTRA_WHEELS:-}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MPLBACKEND=Agg
export FLOWSOLVE_TEST_DEVICE=$DEVICE
# POT instantiates its JAX backend (ahead of torch's) at the first call on torch tensors, and
# the image has JAX with CUDA: that would start JAX on the GPU and take 75% of its memory in
# every process that couples. flowsolve needs POT's numpy and torch backends only.
export POT_BACKEND_DISABLE_JAX=1 POT_BACKEND_DISABLE_CUPY=1 POT_BACKEND_DISABLE_TENSORFLOW=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# -- wheels (the device machine has no network: only what .whl carries) ----------------------
install_wheels() {
    local tag wheels=() skipped=() w
    tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    for w in "$WHEELS"/*.whl ${EXTRA_WHEELS:+"$EXTRA_WHEELS"/*.whl}; do
        [ -e "$w" ] || continue
        case $(basename "$w") in
            *-none-any.whl | *-"$tag"-*) wheels+=("$w") ;;
            *) skipped+=("$w") ;;  # a binary wheel for another Python (the dry run's 3.11)
        esac
    done
    [ ${#skipped[@]} = 0 ] || echo "not for this $tag interpreter, left out: ${skipped[*]}"
    if [ ${#wheels[@]} = 0 ]; then
        echo "no wheels in $WHEELS/ (bash benchmarks/fetch_wheels.sh, then carry .whl)"
        return 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || return
    # flow_matching's wheel ships a top-level package named "tests": keep it from shadowing
    rm -rf "$SITE/tests"
    ls "$SITE"
}

ENV_PY='
import importlib, os, platform, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
      torch.cuda.is_available(), "threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}",
          p.multi_processor_count, "SMs")
for name in ("numpy", "scipy", "torchdiffeq", "torchsde", "ot", "tqdm", "flow_matching",
             "torchcfm", "flowsolve"):
    try:
        m = importlib.import_module(name)
        v = getattr(m, "__version__", "?")
        print(f"{name:<14} {v:<14} {os.path.dirname(m.__file__)}")
    except Exception as err:
        print(f"{name:<14} MISSING ({type(err).__name__}: {err})")
print("cpu", platform.processor() or platform.machine(), os.cpu_count(), "cores")
if os.environ.get("FLOWSOLVE_TEST_DEVICE", "cuda") != "cpu" and not torch.cuda.is_available():
    sys.exit("CUDA is not available to torch: the GPU steps will fail or skip")
'

env_info() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    uname -a
    if command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi
        timeout 20 nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu
    else
        echo "nvidia-smi: not found"
    fi
    grep -m1 "model name" /proc/cpuinfo
    "$PYTHON" -c "$ENV_PY"
}

case $INTERNAL in
    __install) install_wheels; exit ;;
    __env) env_info; exit ;;
esac

mkdir -p "$OUT" || exit 2
WORK=$(mktemp -d)  # each step's own output, for the summary (not in $OUT: 8 files at most)
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps
: >"$STEPS"
START=$SECONDS
FAILED=0

# step NAME LOG BUDGET CMD...: run CMD under timeout (at most what is left of $BUDGET),
# append its output to $OUT/LOG, record status and time.
step() {
    local name=$1 logname=$2 log=$OUT/$2 budget=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    local limit=$((budget < left ? budget : left))
    if ((limit < 10)); then
        printf '%-20s %-8s %7s %6s  %s\n' "$name" SKIPPED - - "no time left" >>"$STEPS"
        echo "===== $name: skipped, ${left}s left of the ${BUDGET}s budget" | tee -a "$log"
        FAILED=1
        return
    fi
    {
        echo
        echo "===== $name  (timeout ${limit}s, $(date -u +%Y-%m-%dT%H:%M:%SZ))"
        echo "\$ $*"
    } | tee -a "$log"
    local t0=$SECONDS rc status
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log" "$WORK/$name.out"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    printf '%-20s %-8s rc=%-4s %5ss  %s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" \
        "$logname" >>"$STEPS"
    echo "===== $name: $status (rc $rc) in $((SECONDS - t0))s" | tee -a "$log"
}

# -- sizes: the real ones on the GPU, tiny ones for the CPU dry run --------------------------
B=benchmarks
if [ "$DEVICE" = cpu ]; then
    LIKELIHOOD=(--device cpu --dims 2 4 --batch 32 --steps 10 --repeats 1)
    SAMPLING=(--device cpu --repeats 2 --batch 64 --steps 8 --threads 1)
    DIVERGENCE=(--device cpu --dims 2 4 --batch 8 --rounds 3 --seconds 1 --threads 1)
    DIVERGENCE_GRAPH=(--device cpu --dims 4 --batch 8 --rounds 3 --seconds 1 --threads 1
                      --create-graph)
    COUPLINGS=(--device cpu --sizes 64 128 --repeats 2)
    TRAIN_GPU_OT=(--device cpu --batches 64 128 --couplings independent sinkhorn
                  --couple-on-device --workers 0 --quick)
    TORCHCFM=(--device cpu --batches 256)
    SDE=(--device cpu --repeats 1 --warmups 1 --batch 64 --steps 10)
    TRAIN_WORKERS=(--device cpu --batches 64 --couplings independent exact --workers 2 --quick)
else
    LIKELIHOOD=(--device "$DEVICE" --dims 2 16 64 256 --batch 1024 --steps 100 --repeats 1)
    SAMPLING=(--device "$DEVICE" --repeats 15)
    DIVERGENCE=(--device "$DEVICE" --rounds 7 --seconds 8)
    DIVERGENCE_GRAPH=(--device "$DEVICE" --dims 16 64 256 --rounds 5 --seconds 5 --create-graph)
    COUPLINGS=(--device "$DEVICE" --sizes 256 1024 4096)
    TRAIN_GPU_OT=(--device "$DEVICE" --batches 256 1024 4096 --couplings independent sinkhorn
                  --couple-on-device --workers 0)
    TORCHCFM=(--device "$DEVICE")
    SDE=(--device "$DEVICE" --repeats 3 --warmups 1)
    TRAIN_WORKERS=(--device "$DEVICE" --batches 256 1024 --couplings independent exact
                   --workers 4 --quick)
fi
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rfEsxX --durations=10
        tests/test_gpu.py tests/test_solve_ode.py tests/test_couplings.py -k "cuda or gpu")
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout=90); fi

echo "gpu_check: DEVICE=$DEVICE PYTHON=$PYTHON OUT=$OUT SITE=$SITE BUDGET=${BUDGET}s" \
    | tee "$OUT/env.log"
step install env.log 90 bash "$SELF" __install
if [ -d "$SITE" ]; then export PYTHONPATH=$SITE:$ROOT; else export PYTHONPATH=$ROOT; fi
step env env.log 60 bash "$SELF" __env
# 1. the CUDA tests (all of tests/test_gpu.py, the cuda tests of the others)
step tests tests.log 150 "${PYTEST[@]}"
# 2. likelihood and sampling, the two headline targets
step likelihood likelihood.log 100 "$PYTHON" $B/bench_likelihood.py "${LIKELIHOOD[@]}"
step sampling sampling.log 60 "$PYTHON" $B/bench_sampling.py "${SAMPLING[@]}"
# 3. divergence methods (the figures behind divergence.auto_method)
step divergence divergence.log 45 "$PYTHON" $B/bench_divergence.py "${DIVERGENCE[@]}"
step divergence_graph divergence.log 35 "$PYTHON" $B/bench_divergence.py "${DIVERGENCE_GRAPH[@]}"
# 4. OT on the GPU: couplings alone, then training steps with a GPU Sinkhorn, then torchcfm
step couplings ot.log 50 "$PYTHON" $B/bench_couplings.py "${COUPLINGS[@]}"
step train_gpu_ot ot.log 60 "$PYTHON" $B/bench_train.py "${TRAIN_GPU_OT[@]}"
step torchcfm ot.log 75 "$PYTHON" $B/bench_torchcfm.py "${TORCHCFM[@]}"
# 5. SDE sampling, then the exact-OT-in-workers training rows
step sde sde.log 45 "$PYTHON" $B/bench_sde.py "${SDE[@]}"
step train_workers ot.log 40 "$PYTHON" $B/bench_train.py "${TRAIN_WORKERS[@]}"

# -- summary ---------------------------------------------------------------------------------
key() {  # key NAME PATTERN: the key lines of a step (and its last lines when it did not pass)
    local f=$WORK/$1.out
    [ -f "$f" ] || return 0
    echo "--- $1"
    grep -E "$2" "$f" | cut -c1-160 | tail -n 40
    if ! grep -q "^$1 *ok " "$STEPS"; then
        echo "    (not ok; its last lines:)"
        tail -n 10 "$f" | cut -c1-160
    fi
}
{
    echo "flowsolve gpu_check: DEVICE=$DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START))s" \
        "of a ${BUDGET}s budget, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(git status --porcelain 2>/dev/null | grep -q . && echo '(uncommitted changes)')"
    grep -E "^(gpu|torch|python) " "$WORK/env.out" 2>/dev/null
    grep -E "MISSING|not available" "$WORK/env.out" 2>/dev/null
    echo
    printf '%-20s %-8s %7s %6s  %s\n' step status rc time log
    cat "$STEPS"
    echo
    key tests '[0-9]+ (passed|failed|errors?)[ ,].* in [0-9.]+s|^(FAILED|ERROR|XPASS|XFAIL) '
    key likelihood '^torch|^ *[0-9]+ +[0-9.]+'
    key sampling '^torch|^(MLP|u = -x)|CapturedSampler|^hand-written|^sample\(solver=.fast_euler.\) '
    key divergence 'speed-up|^(MLP|conv) .*x$|^case'
    key divergence_graph 'speed-up|^(MLP|conv) .*x$|^case'
    key couplings '^torch|^ *B |^ *[0-9]+ +[0-9.]+'
    key train_gpu_ot '^torch|^ *[0-9]+ (independent|exact|sinkhorn)|B= *[0-9]+:|Warning'
    key torchcfm '^torch|^ *[0-9]+ |OT step'
    key sde '^torch|GridBrownian|sdeint|hand-written|^(euler|srk|heun|midpoint|milstein) '
    key train_workers '^ *[0-9]+ (independent|exact)|B= *[0-9]+:'
} >"$OUT/summary.txt"
echo
echo "=================================== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $FAILED
