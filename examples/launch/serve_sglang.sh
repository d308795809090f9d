#!/usr/bin/env bash
# Start the inference side on one 8-GPU node: 4 student SGLang servers (one GPU each) behind an sglang-router on
# port 30000, and the teacher on 4 GPUs (data parallel 4) on port 30001. Blocks until every server is healthy,
# then waits; kill the script's process group to stop them.
#   bash examples/launch/serve_sglang.sh STUDENT_HF_DIR TEACHER_HF_DIR
set -euo pipefail
student=$1 teacher=$2
workers=()
for gpu in 0 1 2 3; do
  port=$((30010 + gpu))
  CUDA_VISIBLE_DEVICES=$gpu python -m sglang.launch_server --model-path "$student" --host 0.0.0.0 --port $port \
    --mem-fraction-static 0.8 --context-length 20480 &
  workers+=("http://$(hostname):$port")
done
CUDA_VISIBLE_DEVICES=4,5,6,7 python -m sglang.launch_server --model-path "$teacher" --host 0.0.0.0 --port 30001 \
  --dp-size 4 --mem-fraction-static 0.8 --context-length 20480 &
for url in "${workers[@]}" "http://$(hostname):30001"; do
  until curl -sf "$url/health" >/dev/null; do sleep 5; done
done
python -m sglang_router.launch_router --host 0.0.0.0 --port 30000 --worker-urls "${workers[@]}" &
until curl -sf "http://$(hostname):30000/health" >/dev/null; do sleep 2; done
echo "[serve_sglang] student router :30000 (${#workers[@]} workers), teacher :30001 ready"
wait
