#!/usr/bin/env bash
# FlashAttention-4 on the device machine, from the repository root there (see docs/benchmarks.md):
#   bash bench/fa4_device.sh unpack DIR   # call 1: DIR/part1/cutlass_ir.so.xz -> /tmp/fa4big (the 184 MiB IR library)
#   bash bench/fa4_device.sh run DIR      # call 2 (same warm machine): install DIR/part2, then bench + GPU tests
#   bash bench/fa4_device.sh run DIR CMD ARGS...   # call 2, running CMD (from PKG) instead, e.g.
#       python3 bench/e2e_hunyuan.py --sizes 720x1280 --backend fa4 --variants dense dense-cudnn ...
# DIR holds the wheels of the `fa4` extra for CPython 3.12 / manylinux x86_64, with nvidia-cutlass-dsl-libs-cu13
# split in two because it is over the 64 MiB a call may carry: part1/cutlass_ir.so.xz (its
# _cutlass_ir.cu13 extension), part2/cute_rt.so.xz (its runtime library) and part2/*.whl (every other wheel).
# $OUT: where logs and JSON go. Runs from this package's folder (PKG, default .).
set -o pipefail
export PYTHONUNBUFFERED=1
mode=$1; dir=$(realpath "$2"); pkg=${PKG:-.}
if [ "$mode" = unpack ]; then
    mkdir -p /tmp/fa4big && xz -dc "$dir/part1/cutlass_ir.so.xz" > /tmp/fa4big/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
    ls -la /tmp/fa4big; python3 --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -m pip show cuda-bindings torch triton 2>/dev/null | grep -E "^(Name|Version)"
    exit 0
fi
S=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target $S "$dir"/part2/*.whl ${EXTRA_WHEELS:-} || exit 3
L=$S/nvidia_cutlass_dsl/cu13/lib
mkdir -p $L && xz -dc "$dir/part2/cute_rt.so.xz" > $L/libcute_dsl_runtime.so && cp "$dir/part2/libcuda_dialect_runtime_static.a" $L/ \
    && cp /tmp/fa4big/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so $S/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/ \
    || exit 4
export PYTHONPATH=$S:$S/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
cd "$pkg" && python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || exit 5
if ! python3 bench/fa4_check.py --smoke 2>&1 | grep -v Warning | tail -3; then
    for alt in "$dir"/part2alt/flash_attn_4-*.whl; do  # a newer beta, if the pinned one does not run here
        [ -f "$alt" ] || continue
        echo "retrying with $(basename "$alt")"
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S "$alt" > /dev/null 2>&1
        python3 bench/fa4_check.py --smoke 2>&1 | tail -4 && break
    done
fi
if [ $# -gt 2 ]; then
    shift 2
    "$@"
    exit $?
fi
python3 bench/fa4_check.py --json "$OUT/fa4_check.json" 2>&1 | tee "$OUT/fa4_check.log"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q tests/test_fa4.py tests/test_kernel_attention_fp8.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
