#!/usr/bin/env bash
# The GPU checks of docs/speed.md in one short run (sized for about 7 minutes on one H200), each
# against its reference in the same process:
#   1. tests:  the CUDA-only tests (no host wait in a step, the CUDA-graphed step, device vs host bits,
#              the compiled/fused step on the GPU)
#   2. mlp:    MLP VAE training against the PyTorch example's loop       (target: >= 4x)
#   3. conv:   conv VAE on 32x32x3, bf16, against plain PyTorch           (target: >= 2x)
#   4. eval:   -L_5000 on 10,000 test images against the plain reference  (target: >= 5x)
#   5. sync:   the step decided by the host vs on the device (reads per epoch, same bits)
# Each part has its own time limit (PART_S seconds, default 150) and writes $OUT/<part>.log, so a part
# that runs long costs only itself. Needs: python3 with a CUDA torch, and Fashion-MNIST's idx files in
# $DATA (default .data/fashion-mnist; copy /usr/share/datasets/fashion-mnist there and carry it).
#
#   bash benchmarks/gpu_checks.sh [part ...]        (default: every part)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
DATA=${DATA:-.data/fashion-mnist}
OUT=${OUT:-/tmp/vaelab-gpu-checks}
PART_S=${PART_S:-150}
PY=${PY:-python3}
mkdir -p "$OUT"

part() {  # part NAME COMMAND...: run it under the time limit, output to the screen and $OUT/NAME.log
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout -k 10 "$PART_S" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -E "^(epoch [0-9]+:|data |run |resuming |model )" "$OUT/$name.log" | tail -n 40
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests mlp conv eval sync)
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for p in "${parts[@]}"; do
    case $p in
        tests) part tests $PY -m pytest -q -p no:cacheprovider -o addopts="" -x tests/test_step_guard.py \
                   tests/test_accel.py -k "cuda or gpu or graphs or fused" ;;
        mlp) part mlp $PY benchmarks/train_throughput.py --device cuda --data-dir "$DATA" --epochs 4 \
                 --variants "vaelab fp32,vaelab fp32 --compile,vaelab bf16 --compile" ;;
        conv) part conv $PY benchmarks/conv_throughput.py --device cuda --n 10000 --epochs 4 \
                  --variants "vaelab bf16,vaelab bf16 --compile" ;;
        eval) part eval $PY benchmarks/eval_throughput.py --device cuda -k 5000 --n 10000 --parts 3 --data-dir "$DATA" ;;
        sync) part sync $PY benchmarks/step_sync.py --device cuda --runs 2 --epochs 3 --compile --data-dir "$DATA" ;;
        *) echo "unknown part $p (tests mlp conv eval sync)"; exit 2 ;;
    esac
done
