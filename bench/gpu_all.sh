#!/usr/bin/env bash
# Every GPU check of the performance issues in one script, for the device tool's GPU machine:
#   bash bench/gpu_all.sh                  # on the GPU machine: results under $OUT (default bench/results/run)
#   TINY=1 bash bench/gpu_all.sh           # the same stages on CPU with the tiny model (a smoke test)
#   STAGES="tests memory" bash bench/gpu_all.sh      # a subset
# Stages (in order; each writes its JSON under $OUT and goes on if one fails):
#   env       versions, GPU, what is installed (triton, bitsandbytes, flash-attn)
#   tests     pytest -m cuda (bf16 vs fp32 goldens, ZeroAdamW on GPU, QLoRA step 0, flash-attn vs SDPA)
#   memory    phi3v + HF, lora/qlora, DocVQA, full recomputation: measured peak next to the plan; and
#             phi3v with --offload_activations
#   speed     phi3v + HF, lora/qlora, DocVQA: the fastest config (compiled, no recomputation)
#   full      phi3v + HF, full_frozen_vision/full, DocVQA, selective recomputation (fits 80 GB)
#   optim     ZeroAdamW.step vs clip_grad_norm_ + fused AdamW on the GPU
#   nf4       the NF4 dequantisation op (Triton) vs the old torch path
#   trainpy   train.py itself on DocVQA-shaped synthetic data with its defaults (LoRA)
# Wall time on an H100/H200 is not measured yet (no GPU was lent while this was written); keep the
# device tool's timeout with room for a rerun and split STAGES across calls if needed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/run}
STAGES=${STAGES:-"env tests memory speed full optim nf4 trainpy"}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:bnb:.
if [ "${TINY:-0}" = 1 ]; then
  TS="--config tiny --device cpu --steps 1 --warmup 1 --impl phi3v"; OPT="--params 2e6 --steps 2 --warmup 1 --device cpu"
  NF4="--tiny --device cpu"; TP="--config tiny --steps 2 --batch_size 2 --warmup_steps 1"; PYTEST_M="not slow"
  PYTEST_FILES="tests/test_gpu.py"
else
  TS="--steps 6 --warmup 2"; OPT="--params 1e9 --steps 5 --warmup 2 --device cuda"; NF4=""
  TP="--steps 10 --batch_size 8 --warmup_steps 4"; PYTEST_M="cuda"; PYTEST_FILES="tests/test_gpu.py tests/test_nf4_op.py"
fi
run() {   # name, command...: time it, keep its output, never stop the script
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  local t0=$SECONDS
  "$@" >>"$OUT/log.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
}
for stage in $STAGES; do
  case $stage in
    env) run env python -c "import torch, importlib.util as u; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', \
{m: u.find_spec(m) is not None for m in ('triton', 'bitsandbytes', 'flash_attn', 'transformers', 'peft')})";;
    tests) run tests env PHI3V_GOLDEN=${PHI3V_GOLDEN:-.gpu/golden} python -m pytest -q -m "$PYTEST_M" $PYTEST_FILES;;
    memory) run memory python bench/train_step.py $TS --modes lora,qlora --samples docvqa --recompute full \
              --out "$OUT/memory.json"
            run memory_offload python bench/train_step.py $TS --impl phi3v --modes lora,qlora --samples docvqa \
              --recompute full --offload_activations --out "$OUT/memory_offload.json";;
    speed) run speed python bench/train_step.py $TS --modes lora,qlora --samples docvqa --recompute none --compile \
             --out "$OUT/speed.json";;
    full) run full python bench/train_step.py $TS --modes full_frozen_vision,full --samples docvqa \
            --recompute selective --compile --out "$OUT/full.json";;
    optim) run optim sh -c "python bench/optim_step.py $OPT --check > '$OUT/optim.txt'";;
    nf4) run nf4 sh -c "python bench/nf4.py $NF4 > '$OUT/nf4.txt'";;
    trainpy) run trainpy sh -c "python bench/synthetic_run.py --out /tmp/phi3v-synthetic $TP > '$OUT/trainpy.json'";;
    *) echo "unknown stage $stage" | tee -a "$OUT/log.txt";;
  esac
done
echo "results in $OUT:"; ls -l "$OUT"
