#!/usr/bin/env bash
# The ELLE stream at the paper's base growth schedule (6/384 -> 12/768, configs/elle_stream_gpu.yaml)
# on one GPU machine, both architectures, within one short lease:
#
#   BENCH_CORPUS=/path/to/corpus OUT=/results/dir bash bench/gpu_elle_stream.sh
#
# One Ray cluster (`ray start --head`) takes every method of every architecture side by side as separate
# drivers, each training worker holding a fraction of the GPU: these models are far too small to fill an
# H200 one at a time, and a stage's fixed costs (worker start, first batch) dominate at a few hundred steps.
# The baselines match the budget ELLE's config plans (--match planned: the FLOPs and steps its run reports),
# so nothing waits for ELLE. LIMIT bounds the training; a method cut off by it is left out of the report,
# which is written from what finished; rerunning with the same WORK continues each run from its last
# checkpoint (--resume). Wall times of methods that shared the GPU are not comparable; FLOPs are.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/elle-stream-gpu}
STEPS=${STEPS:-200}
LIMIT=${LIMIT:-480}  # seconds for the whole training
METHODS=${METHODS:-naive er scratch_large}
ARCHS=${ARCHS:-gpt2 bert}
DOMAINS=${DOMAINS:-wb news reviews bio cs}
GPU_FRACTION=${GPU_FRACTION:-0.12}  # per training worker: up to 8 side by side
PY=${PY:-python3}
mkdir -p "$WORK" "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0 RAY_DATA_LOG_LEVEL=WARNING
# Ray 2.60 heads require a token: one for this cluster, seen by the head and every driver
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$($PY -c "import secrets; print(secrets.token_hex(32))")}
# --block keeps the head in this script's hands: stopping it stops this cluster alone (`ray stop` would stop
# every Ray cluster of the machine)
$PY -m ray.scripts.scripts start --head --block --port 0 --disable-usage-stats ${RAY_START_ARGS:-} \
    > "$WORK/ray-start.log" 2>&1 &
HEAD=$!
ADDR=
# SIGINT is ignored by background jobs; a head stopped this way leaves its address file, which would send a
# later plain `ray.init()` on this machine to a dead cluster
trap 'kill -TERM $HEAD 2> /dev/null  # the head drains for up to 30 s, longer on a loaded machine
      for _ in $(seq 45); do kill -0 $HEAD 2> /dev/null || break; sleep 1; done; kill -KILL $HEAD 2> /dev/null
      [ -n "$ADDR" ] && grep -qs "$ADDR" /tmp/ray/ray_current_cluster && rm -f /tmp/ray/ray_current_cluster' EXIT
for _ in $(seq 120); do
    ADDR=$(grep -o "address='[^']*'" "$WORK/ray-start.log" | head -1 | cut -d"'" -f2)
    [ -n "$ADDR" ] && break
    kill -0 $HEAD 2> /dev/null || { cat "$WORK/ray-start.log"; exit 1; }
    sleep 1
done
echo "[gpu-bench] Ray head at $ADDR"
bench() {  # bench LOG ARGS...
    local log=$1; shift
    timeout -k 10 "$LIMIT" $PY bench/elle_stream.py --address "$ADDR" --out "$WORK" --no-report --resume \
        --match planned --own-memory \
        --base "configs/elle_stream_gpu.yaml" --name elle_stream_gpu --steps "$STEPS" \
        --domains $DOMAINS --set "scaling.gpus_per_worker=$GPU_FRACTION" "data.packed_path=$WORK/packed" ${SET:-} \
        "$@" > "$WORK/$log.log" 2>&1
    echo "[gpu-bench] $log: exit $? at $(date +%T)"
}
t0=$(date +%s)
# the tokenizers and the packed domains (data.pretokenize) first: the drivers below share them
$PY bench/elle_stream.py --out "$WORK" --base "configs/elle_stream_gpu.yaml" --domains $DOMAINS \
    --arch $ARCHS --prepare-only --address "$ADDR" --set "data.packed_path=$WORK/packed" ${SET:-} || exit 1
echo "[gpu-bench] tokenizers and packed domains ready at $(date +%T)"
PIDS=()  # a bare `wait` would also wait for the head, which runs until the end
for a in $ARCHS; do
    for m in elle $METHODS; do bench "$a-$m" --arch "$a" --methods "$m" & PIDS+=($!); done
done
wait "${PIDS[@]}"
echo "[gpu-bench] training done in $(( $(date +%s) - t0 )) s"
$PY bench/elle_stream.py --out "$WORK" --base "configs/elle_stream_gpu.yaml" --name elle_stream_gpu \
    --steps "$STEPS" --domains $DOMAINS --arch $ARCHS --report-only
cp bench/results/elle_stream_gpu* "$WORK"/partial-*.json "$OUT"/ 2>/dev/null
for f in "$WORK"/*.log; do echo "== $f"; grep -E "\[run\]|\[bench\]|Error|step .*/" "$f" | tail -15; done \
    > "$OUT/gpu_elle_stream_logs.txt"
head -12 "$OUT/elle_stream_gpu.md" 2>/dev/null
