#!/usr/bin/env bash
# The GPU checks and benchmarks of the kernel, inference and scale-out issues, step by step, for one device
# call (10 minutes at most: name the steps that fit). Each step's output goes to $OUT/<step>.log; its exit
# status and last lines are printed. Wheels in .whl/ (fla-core, einops, pytest-xdist, execnet: carry them) are
# installed first.
#
#   bash benchmarks/gpu_all.sh tests                    # about 4 minutes on an H200 with xdist (162 tests)
#   bash benchmarks/gpu_all.sh moe e2e dims1            # about 9 minutes
#   bash benchmarks/gpu_all.sh multi-parity multi-80b    # on nvidia-h200-x2: about 5 minutes (parity ~230 s)
#   bash benchmarks/gpu_all.sh multi-scaling multi-long  # about 4 minutes
# Steps: tests (the GPU tests), train (60 bf16 steps of the tiny preset), gdn, gdn-sweep, moe, e2e (slice),
# e2e-full, dims1; on 2 GPUs: multi-parity, multi-scaling, multi-80b, multi-long (benchmarks/multi_gpu.py's
# steps, each launched by torchrun on its own, so one that fails leaves the others).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
# the tests in four processes where pytest-xdist is there (carry its wheels): most of their time is compiling
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")

run() {  # run NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 30 "$OUT/$name.log"
}

for step in "$@"; do
    case $step in
        tests) run tests 570 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE --durations=8 $XDIST tests/test_triton_gdn.py \
                   tests/test_moe_ops.py tests/test_fused_ops.py tests/test_decode.py ;;
        train) run train 120 python3 -m qwen3next train "$STDLIB/json" "$STDLIB/email" "$STDLIB/asyncio" \
                   --config tiny --device cuda --steps 60 --warmup 10 --seq-len 512 --batch-size 16 \
                   --precision bf16 --eval-every 30 --log-every 20 --out "$OUT/train-run" --no-progress ;;
        gdn) run gdn 240 python3 benchmarks/gdn_gpu.py ;;
        gdn-sweep) run gdn-sweep 480 python3 benchmarks/gdn_gpu.py --sweep ;;
        moe) run moe 300 python3 benchmarks/moe_gpu.py --out "$OUT" ;;
        e2e) run e2e 300 python3 benchmarks/e2e_gpu.py --variants slice --reps 2 --steps 15 --out "$OUT" ;;
        e2e-full) run e2e-full 480 python3 benchmarks/e2e_gpu.py --variants full --reps 2 --steps 15 --out "$OUT" ;;
        dims1) run dims1 150 python3 benchmarks/dims1_gpu.py ;;
        multi-parity|multi-scaling|multi-80b|multi-long)
            name=${step#multi-}
            PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run "$step" 420 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py "${name/80b/model80b}" --out "$OUT" ;;
        *) echo "unknown step $step" ;;
    esac
done
