#!/usr/bin/env bash
# Run ON THE GPU MACHINE from the repository root, with .whl/ carried (scripts/gpu-wheels.sh):
# the same end-to-end benchmark as `cake bench`, with a Llama-3-8B-shaped model (random
# weights, bf16) on one GPU, long contexts, a local-disk store. Results go to $OUT (or ./out).
set -euo pipefail
OUT="${OUT:-$PWD/gpu-bench-results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
# Exactness first: bf16 on the GPU, merged vs compute-only first-token logits within 0.05.
python3 scripts/exactness_check.py --model random:llama3-8b --dtype bfloat16 --device cuda \
  --tokens 16384 --chunk 256 --tolerance 0.05 2>&1 | tee "$OUT/exactness.log"
python3 -m services.launcher.cli bench --model random:llama3-8b --dtype bfloat16 --device cuda \
  --contexts ${CONTEXTS:-16384 32768} --reps ${REPS:-2} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
