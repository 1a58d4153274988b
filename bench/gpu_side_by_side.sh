#!/usr/bin/env bash
# Ours vs PyTorch (cuDNN) on one NVIDIA GPU, in under 8 minutes.
#
# For a machine where jax[cuda], flax, optax, orbax and torch are installed
# (Python 3.12). Packages missing there (nibabel, grain, ml-collections,
# monai, portpicker, tqdm) may travel as wheels in .whl/ (repo root): they are
# installed into /tmp/site first. Run from the repository root:
#
#   bash bench/gpu_side_by_side.sh [OUT_DIR]
#
# Reports, for the paper's network (base 16, depth 4, no normalisation) in
# float32 and bfloat16 (ours: bfloat16 layers, float32 params and loss;
# theirs: torch.autocast), train-step time and peak device memory on the
# paper's whole 128x224x256 volume (batch 1) and on 2 x 128^3 patches, and
# sliding-window inference of a 128x224x256 volume (128^3 windows), with the
# repetitions interleaved. Then the input pipeline's batches/s on this
# machine's CPU cores (bench/bench_pipeline.py: 2 x 128^3 patches and whole
# 128x224x256 volumes, in-process and with 4 and 8 grain workers), to set
# against the 1 / step-time batches/s the GPU step consumes. Writes the
# tables to OUT_DIR (default: $OUT, else bench_out/). See
# bench/side_by_side.py for what each side runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$out/gpu.txt"
python3 - <<'EOF' | tee -a "$out/gpu.txt"
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
EOF
for dtype in float32 bfloat16; do
  timeout 200 python3 bench/side_by_side.py --model paper --dtype "$dtype" \
    --work whole step128 infer_whole --repeats 5 --memory \
    2>&1 | grep -v Warning | tee "$out/side_by_side_$dtype.txt"
done
# Last, so that a slow phantom build cannot cost the tables above.
timeout 120 python3 bench/bench_pipeline.py --cases 2 --batches 20 \
  --workers 0 4 8 2>&1 | grep -v Warning | tee "$out/pipeline.txt" || true
