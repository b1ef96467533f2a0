#!/usr/bin/env bash
# The GPU checks of a run's overhead, in one call of under 10 minutes on a GPU machine that has no Ray and
# no package index (build the tarball here first: bash bench/ray_site.sh; carry .whl to the machine):
#
#   bash bench/gpu_check.sh            # on the GPU machine; results under $OUT (default bench/results)
#   SMOKE=1 bash bench/gpu_check.sh    # here, on the CPU: the same steps at toy sizes (checks the script)
#
# 1. bench/run_overhead.py: the demo and the ELLE demo end to end on Ray beside the plain loop, on the GPU
#    (scaling.use_gpu), same card, same call -> run_overhead_gpu.{json,md}
# 2. bench/gpu_stage_mfu.py: a stage's step under Ray Train beside bench/gpu_throughput.py's plain step on
#    the same GPT-2-small-sized model (goal >= 0.95x) -> gpu_stage_mfu.{json,md}
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PY:-python3}
if ! $PY -c "import ray" 2> /dev/null; then
    [ -f .whl/ray-site.tar.gz ] || { echo "no Ray here and no .whl/ray-site.tar.gz (bash bench/ray_site.sh)"; exit 1; }
    mkdir -p /tmp/site && tar -xzf .whl/ray-site.tar.gz -C /tmp/site
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$OUT"
if [ -n "${SMOKE:-}" ]; then
    timeout 600 $PY bench/run_overhead.py --configs demo --name run_overhead_smoke --set train.steps=4
    timeout 300 $PY bench/gpu_stage_mfu.py --smoke --name gpu_stage_mfu_smoke
    exit $?
fi
timeout 330 $PY bench/run_overhead.py --name run_overhead_gpu \
    --set scaling.use_gpu=true scaling.gpus_per_worker=0.5 scaling.cpus_per_worker=2
echo "[gpu-check] run overhead: exit $?"
timeout 200 $PY bench/gpu_stage_mfu.py --name gpu_stage_mfu
echo "[gpu-check] stage MFU: exit $?"
cp bench/results/run_overhead_gpu.* bench/results/gpu_stage_mfu.* "$OUT"/ 2> /dev/null || true
