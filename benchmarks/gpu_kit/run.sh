#!/usr/bin/env bash
# On the GPU machine, from the checkout, with the kit of prepare.sh and the sweep's data folder
# (runs/repro_small/data) beside it: the strategy files and the train-step benchmark.
#   bash benchmarks/gpu_kit/run.sh [KIT_DIR] [OUT_DIR]     # defaults: .gpu and $OUT (or /tmp/gpu-out)
# STRATEGIES="deepspeed" runs some strategy files only (default: all three; "fsdp fsdp_layers"
# sets AdapterWrapPolicy's FSDP units beside the decoder layers alone); TRAIN_STEP=0 skips
# the train-step benchmark; STEPS sets the strategy fits' steps (default 64); T1, T2, T3, T4 and
# T5 are the time limits in seconds of the strategy fits, the train-step benchmark, the two
# DeepSpeed checks and fsdp_noshard_check.py (32 rows; 240 s by default); MEMORY="phi3-mini mistral-7b" runs memory_check.py
# on those shapes (T6 its limit). Logs: at most 8 files come back from a device call,
# so pack them (tar) rather than count on each one.
set -u
kit=${1:-.gpu}
out=${2:-${OUT:-/tmp/gpu-out}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$kit"/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import sys,torch,transformers,peft,lightning; print(sys.version.split()[0]); [print(m.__name__, m.__version__) for m in (torch,transformers,peft,lightning)]"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
timeout "${T1:-360}" python3 benchmarks/gpu_strategies.py --data runs/repro_small/data \
  --out /tmp/gpu --random-weights-from "$kit/smollm2-shape" --random-encoder-from "$kit/minilm-shape" \
  --steps ${STEPS:-64} --eval-items 32 --strategies ${STRATEGIES:-ddp fsdp deepspeed} \
  > "$out/gpu_strategies.log" 2>&1
echo "gpu_strategies rc=$?"; tail -8 "$out/gpu_strategies.log"
cp /tmp/gpu/gpu_strategies.json "$out/" 2>/dev/null
for s in ddp fsdp fsdp_layers deepspeed; do cp /tmp/gpu/$s/fit.log "$out/fit-$s.log" 2>/dev/null; done
for s in fsdp fsdp_layers; do cp /tmp/gpu/$s/merge.log "$out/merge-$s.log" 2>/dev/null; done
timeout "${T5:-240}" python3 benchmarks/gpu_kit/fsdp_noshard_check.py > "$out/fsdp_noshard_check.log" 2>&1
echo "fsdp_noshard_check rc=$?"; grep '^|' "$out/fsdp_noshard_check.log"
if [ -n "${MEMORY:-}" ]; then  # e.g. MEMORY="phi3-mini mistral-7b": the paper configs' peak memory
  timeout "${T6:-300}" python3 benchmarks/gpu_kit/memory_check.py --shape $MEMORY \
    > "$out/memory_check.log" 2>&1
  echo "memory_check rc=$?"; grep '^|' "$out/memory_check.log"
fi
timeout "${T3:-120}" python3 benchmarks/gpu_kit/deepspeed_check.py > "$out/deepspeed_check.log" 2>&1
echo "deepspeed_check rc=$?"; grep '^|' "$out/deepspeed_check.log"
timeout "${T4:-240}" python3 benchmarks/gpu_kit/deepspeed_fit_check.py > "$out/deepspeed_fit_check.log" 2>&1
echo "deepspeed_fit_check rc=$?"; grep '^|' "$out/deepspeed_fit_check.log"
[ "${TRAIN_STEP:-1}" = 0 ] && exit 0
timeout "${T2:-150}" python3 benchmarks/train_step.py --accelerator gpu --precision bf16-mixed \
  --dtype bfloat16 --random-weights-from "$kit/smollm2-shape" --batch-size 8 --seq-len 256 \
  --steps 20 --fit-steps 10 --num-adapters 4 > "$out/train_step.log" 2>&1
echo "train_step rc=$?"; tail -8 "$out/train_step.log"
