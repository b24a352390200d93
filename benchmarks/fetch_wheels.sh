#!/usr/bin/env bash
# Download into .whl/ the wheels that the GPU machine (device tool, kind nvidia-h200) lacks,
# for its python3: CPython 3.12, x86-64 manylinux. The machine has no network; a device call
# carries .whl (carry: [".whl"]) and benchmarks/gpu_check.sh installs them with --no-index.
#
# The image already holds torch 2.11, torchdiffeq 0.2.5, numpy, scipy, matplotlib, pandas,
# scikit-learn, absl-py, tqdm, pytest, hypothesis (/work/.library/device/KINDS.md, "Python
# packages already there"). Missing, with what their METADATA requires (Requires-Dist):
#   POT 0.9.7.post1       numpy, scipy                                 (binary, cp312)
#   torchsde 0.2.6        numpy, scipy, torch, trampoline
#   trampoline 0.1.2      -
#   flow-matching 1.0.10  numpy, torch, torchdiffeq        (bench_likelihood's reference)
#   torchcfm 1.0.7        torch, matplotlib, numpy, scipy, scikit-learn, pot, torchdiffeq,
#                         absl-py, pandas, torchdyn   (bench_torchcfm's reference)
# torchdyn is left out on purpose: only torchcfm.utils imports it, and the benchmark uses
# torchcfm.conditional_flow_matching and torchcfm.optimal_transport (torch, numpy, POT).
# Versions: those of the project's .venv (POT, torchsde, trampoline, torchcfm) and the one
# docs/benchmarks.md names for flow_matching. One version of each: two stop the install.
#
# Run from anywhere: bash benchmarks/fetch_wheels.sh   (PIP=... to choose the pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
DEST=.whl

WHEELS=(POT==0.9.7.post1 torchsde==0.2.6 trampoline==0.1.2 flow-matching==1.0.10 torchcfm==1.0.7)

git check-ignore -q "$DEST/x.whl" || {
    echo "$DEST/ is not git-ignored: add '$DEST/' to .gitignore (or .git/info/exclude)" >&2
    exit 1
}
mkdir -p "$DEST"
# --platform any covers the pure-Python py3-none-any wheels; pip takes the manylinux tags
# exactly, so the list names each one the README names.
for spec in "${WHEELS[@]}"; do
    $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any \
        -d "$DEST" "$spec"
done

# exactly one wheel per package, the pinned version
status=0
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec#*==}
    stem=$(echo "$name" | tr 'A-Z-' 'a-z_')
    found=$(find "$DEST" -maxdepth 1 -iname "${stem}-*.whl" | sort)
    n=$(printf '%s\n' "$found" | grep -c . || true)
    if [ "$n" != 1 ] || ! printf '%s' "$found" | grep -q -- "-${version}-"; then
        echo "want one ${stem}-${version} wheel in $DEST, found: ${found:-none}" >&2
        status=1
    fi
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
exit $status
