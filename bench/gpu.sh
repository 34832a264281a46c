#!/usr/bin/env bash
# The GPU figures, on a CUDA machine: the CUDA-marked tests, then bfloat16 comparisons at about 0.5B parameters
# (bench/models.py): r1lab's sampler against transformers' generate at batch 64 and 256, on a random Qwen2 and on
# r1lab's DeepSeek-V3 (MLA + MoE, about 0.4B activated), and a GRPO step against TRL's at equal settings. JSON with
# tokens/s per GPU lands in bench/results/gpu/.
#
#   bash bench/gpu.sh            on a CUDA machine (about 15 minutes on one H100-class GPU)
#   bash bench/gpu.sh --smoke    the same scripts at tiny sizes on the CPU: what a machine without a GPU can check
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--smoke" ]; then
  dev=cpu dtype=float32 size=tiny batches="4 8" tokens=8 repeats=1 steps="--warmup 0 --steps 1" threads=1
  out=bench/results/gpu-smoke
else
  "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU; bash bench/gpu.sh --smoke runs its scripts on the CPU')"
  dev=cuda dtype=bfloat16 size=0.5b batches="64 256" tokens=128 repeats=3 steps="--warmup 2 --steps 5"
  threads=$(nproc)
  out=bench/results/gpu
  "$py" -m pytest -m cuda -q -p no:cacheprovider
  "$py" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
fi
for model in qwen2 native; do
  # shellcheck disable=SC2086
  "$py" bench/sampler.py --model "$model" --size "$size" --device "$dev" --dtype "$dtype" --batches $batches \
    --new-tokens "$tokens" --repeats "$repeats" --threads "$threads" --out "$out/sampler-$model.json"
done
# shellcheck disable=SC2086
"$py" bench/grpo_vs_trl.py --size "$size" --device "$dev" --dtype "$dtype" $steps --threads "$threads" \
  --out "$out/grpo_vs_trl.json"
