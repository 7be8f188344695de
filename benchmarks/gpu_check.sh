#!/usr/bin/env bash
# The one prepared GPU check (issue 12, item 8): run it as one command on one H100 or H200, nothing fetched.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps, in this order, each writing under DIR (default benchmarks/results/<UTC date>-gpu-check/):
#   1. pytest -m gpu            CUDA-graph replay equals eager, bf16 on the GPU tracks float32, the bound-once
#                               TensorRT buffers under capture (and the TensorRT tests, where TensorRT is there)
#   2. k4trt bench              full-size random weights, torch and torch-graph, 12 s at 672x384, 1 warm-up + 2
#                               runs each, with the original implementation beside them when its code is carried
#   3. k4trt.bench.micro        attention at [1, 48, 25424, 64] (SDPA flash, cuDNN, memory-efficient) and the
#                               DiT's four GEMMs, bf16 against FP8 torch._scaled_mm
# Budget on one H100/H200: ≈ 1 min for step 1, ≈ 5-6 min for step 2 (three subjects built at full size, three
# runs each), ≈ 1 min for step 3: under 9 minutes.
#
# --dry-run runs the same three steps at tiny size on a CPU (the test suite runs it, tests/test_gpu_check.py).
#
# What to carry to a machine without network (code plus wheels stay under 64 MiB):
#   - this checkout (≈ 2 MiB of code; run from its root, nothing is installed: PYTHONPATH points here);
#   - the original's code, optional: a checkout of ai-forever/Kandinsky-4 (code only, ≈ 1 MiB) at
#     benchmarks/carry/Kandinsky-4 or named by K4TRT_ORIGINAL;
#   - wheels the machine lacks, in benchmarks/wheels/ (installed from there, --no-index). The nvidia-h200 image
#     has torch, numpy, transformers, safetensors, sentencepiece, einops, matplotlib, pytest; it lacks:
#       imageio-ffmpeg (k4trt's writer; ≈ 27 MiB), diffusers (the original's VAE and scheduler; ≈ 4 MiB),
#       omegaconf and antlr4-python3-runtime (the original's configs; < 1 MiB), and tensorrt-cu13 for the
#       TensorRT tests (≈ 2 GiB: too large to carry under 64 MiB, so those tests skip there with the reason).
#     `benchmarks/gpu_check.sh --wheels` prints the pip download command for them.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --wheels)
            echo "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" \
                 "--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64" \
                 "-d benchmarks/wheels imageio-ffmpeg diffusers omegaconf antlr4-python3-runtime==4.9.3"
            exit 0 ;;
        *) echo "usage: benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--wheels]" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-benchmarks/results/$(date -u +%Y%m%d-%H%M%S)-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/k4trt-site benchmarks/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/k4trt-site"
fi
ORIGINAL=${K4TRT_ORIGINAL:-benchmarks/carry/Kandinsky-4}

status=0
step() { echo "== $1" | tee -a "$OUT/log.txt"; }

step "1/3 pytest -m gpu"
# the modules that hold gpu tests, so a reference library another module needs (diffusers) is not required here
gpu_tests=$(grep -l "mark.gpu" tests/test_*.py)
"$PY" -m pytest -q -m gpu -p no:cacheprovider $gpu_tests 2>&1 | tee "$OUT/pytest.txt" || {
    code=${PIPESTATUS[0]}; [[ $code -eq 5 ]] || status=1; }  # 5: nothing selected ran (no GPU): not a failure

step "2/3 k4trt bench"
if [[ $DRY -eq 1 ]]; then
    bench=(--tiny --device cpu --warmup 1 --repeat 1)
else
    bench=(--size 672x384 --duration 12 --warmup 1 --repeat 2)
    [[ -f "$ORIGINAL/kandinsky/__init__.py" ]] && bench+=(--original "$ORIGINAL")
fi
"$PY" -m k4trt bench --backends torch,torch-graph "${bench[@]}" --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt" || status=1

step "3/3 attention and GEMM micro-benchmarks"
micro=()
[[ $DRY -eq 1 ]] && micro=(--tiny --warmup 1 --repeat 2)
"$PY" -m k4trt.bench.micro --out "$OUT/micro.json" "${micro[@]}" 2>&1 | tee "$OUT/micro.txt" || status=1

echo "results in $OUT (exit $status)" | tee -a "$OUT/log.txt"
exit $status
