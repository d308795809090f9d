#!/usr/bin/env bash
# Start the inference side on one 8-GPU node: 4 student SGLang servers (one GPU each) behind an sglang-router on
# port 30000, and the teacher on 4 GPUs (data parallel 4) on port 30001. Every server and the router require
# $SGLANG_API_KEY (--api-key; api_key.sh sets it, generating one when unset), since they listen on 0.0.0.0 and
# accept update_weights_from_disk. Blocks until every server is healthy, then waits; kill the script's process
# group to stop them. --dry-run prints the command lines (the key as $SGLANG_API_KEY) and starts nothing.
#   bash examples/launch/serve_sglang.sh [--dry-run] STUDENT_HF_DIR TEACHER_HF_DIR
set -euo pipefail
dry_run=false
if [[ ${1:-} == --dry-run ]]; then dry_run=true; shift; fi
student=${1:?usage: serve_sglang.sh [--dry-run] STUDENT_HF_DIR TEACHER_HF_DIR} teacher=${2:?no TEACHER_HF_DIR}
source "$(dirname "${BASH_SOURCE[0]}")/api_key.sh"
host=$(hostname)

# start COMMAND...: run it in the background, or (--dry-run) print it with the key shown as $SGLANG_API_KEY
start() {
  if $dry_run; then
    local word words=()
    for word in "$@"; do
      if [[ $word == "$SGLANG_API_KEY" ]]; then words+=('$SGLANG_API_KEY'); else words+=("$(printf %q "$word")"); fi
    done
    echo "${words[*]}"
  else
    "$@" &
  fi
}

# wait_healthy URL...: block until every URL answers /health (not in a dry run)
wait_healthy() {
  local url
  for url in "$@"; do
    until $dry_run || healthy "$url"; do sleep 5; done
  done
}

workers=()
for gpu in 0 1 2 3; do
  port=$((30010 + gpu))
  start env CUDA_VISIBLE_DEVICES=$gpu python -m sglang.launch_server --model-path "$student" --host 0.0.0.0 \
    --port $port --api-key "$SGLANG_API_KEY" --mem-fraction-static 0.8 --context-length 20480
  workers+=("http://$host:$port")
done
start env CUDA_VISIBLE_DEVICES=4,5,6,7 python -m sglang.launch_server --model-path "$teacher" --host 0.0.0.0 \
  --port 30001 --api-key "$SGLANG_API_KEY" --dp-size 4 --mem-fraction-static 0.8 --context-length 20480
wait_healthy "${workers[@]}" "http://$host:30001"
# the router checks the key on every request but /health, and passes it to the workers it starts with
start python -m sglang_router.launch_router --host 0.0.0.0 --port 30000 --api-key "$SGLANG_API_KEY" \
  --worker-urls "${workers[@]}"
$dry_run && exit 0
wait_healthy "http://$host:30000"
echo "[serve_sglang] student router :30000 (${#workers[@]} workers), teacher :30001 ready"
wait
