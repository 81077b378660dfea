#!/usr/bin/env bash
# GPU check: CUDA training agrees with the CPU and how fast it is.
# Runs on a machine with an NVIDIA GPU, Python with numpy + safetensors, and a probex binary
# built with `CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda` (PROBEX=path).
# Prints a short table; exit 1 when CPU and CUDA disagree.
set -euo pipefail
cd "$(dirname "$0")"
PROBEX=${PROBEX:-../target/release/probex}
MODELS=${MODELS:-1000}
PEAK_TFLOPS=${PEAK_TFLOPS:-67}   # H100 SXM fp32 (non-tensor) datasheet rate
rm -rf .gpu && mkdir -p .gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
date -u
# CUDA agrees with the CPU on small trainings of every model (stages/tests/cuda_agreement.rs):
# AGREEMENT=path to that test binary, built here with
# `CUDARC_CUDA_VERSION=13000 cargo test --features cuda --test cuda_agreement --no-run`.
# PROBEX_REQUIRE_CUDA makes a missing driver a failure instead of a skip.
if [[ -n "${AGREEMENT:-}" ]]; then
  echo "== agreement tests (CPU vs CUDA)"
  PROBEX_REQUIRE_CUDA=1 "$AGREEMENT" --nocapture --test-threads 1
fi
echo "== generating $MODELS models of one 768x768 layer"
python3 make_models.py .gpu/models --models "$MODELS" --shape 768x768
mem_log=.gpu/mem.log
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$mem_log" 2>/dev/null || true; sleep 0.5; done ) &
sampler=$!
trap 'kill $sampler ${gang_sampler:-} 2>/dev/null || true' EXIT
echo "== cpu"
"$PROBEX" run gpu-check.toml --cache .gpu/cache-cpu --device cpu --out .gpu/run-cpu --progress plain
echo "== cuda"
"$PROBEX" run gpu-check.toml --cache .gpu/cache-cuda --device cuda --out .gpu/run-cuda --progress plain
echo "== cuda timing"
"$PROBEX" run gpu-time.toml --cache .gpu/cache-cuda --device cuda --out .gpu/run-time --progress plain
kill $sampler 2>/dev/null || true
echo "peak GPU memory used: $(sort -n "$mem_log" | tail -1) MiB"
# Sweep mode: the epoch time of gangs of 768x768 layers stepped as one batched problem against
# solo trainings, both on the tensor path, with each gang's peak GPU memory. GANG_BENCH = the
# gang_epoch example, built here with
# `CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda --example gang_epoch`
# (target/release/examples/gang_epoch). Each gang size runs in its own process (a fresh memory
# pool); a gang that fails (out of memory) is reported and the script goes on.
if [[ -n "${GANG_BENCH:-}" ]]; then
  echo "== gangs: batched vs solo epochs on cuda, ${GANG_MODELS:-400} models per 768x768 layer"
  for g in ${GANGS:-1 4 12 24}; do
    gang_log=.gpu/mem-gang-$g.log
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$gang_log" 2>/dev/null || true; sleep 0.5; done ) &
    gang_sampler=$!
    timeout "${GANG_TIMEOUT:-300}" "$GANG_BENCH" --device cuda --gangs "$g" \
      --models "${GANG_MODELS:-400}" --epochs "${GANG_EPOCHS:-4}" --solo 1 \
      || echo "gang of $g failed (exit $?)"
    kill $gang_sampler 2>/dev/null || true
    echo "gang of $g: peak GPU memory $(sort -n "$gang_log" | tail -1) MiB"
  done
fi
# Beside PyTorch: the authors' ProbeXClassification and training loop on the same models and
# GPU, TF32 off and on, data on the GPU (PyTorch's best case) and through their DataLoader.
# PYTORCH=0 skips it.
if [[ "${PYTORCH:-1}" != 0 ]]; then
  echo "== the authors' PyTorch ProbeX on the same models"
  PYTHONUNBUFFERED=1 timeout "${PYTORCH_TIMEOUT:-300}" python3 pytorch_epoch.py .gpu/models \
    --epochs "${PYTORCH_EPOCHS:-5}" --json .gpu/pytorch.json || echo "pytorch timing failed (exit $?)"
fi
n_train=$(( MODELS - 2 * MODELS / 10 ))
python3 compare_runs.py .gpu/run-cpu .gpu/run-cuda .gpu/run-time "$n_train" 768 768 128 "$PEAK_TFLOPS" \
  .gpu/pytorch.json
