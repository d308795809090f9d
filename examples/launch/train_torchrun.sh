#!/usr/bin/env bash
# Plain multi-node torchrun launch of the trainer (run it on every training node, same arguments):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 SERVE_HOST=node2 bash examples/launch/train_torchrun.sh CONFIG [k=v ...]
# The inference node runs examples/launch/serve_sglang.sh; the trainer reaches it at $SERVE_HOST.
# The trainer writes weights to <out>/weights/<version> for update_weights_from_disk: <out> must be on a
# filesystem the inference node can read. The trainer sends $SGLANG_API_KEY to the servers (api_key.sh: export
# the key serve_sglang.sh used, or share its key file).
set -euo pipefail
config=$1; shift
source "$(dirname "${BASH_SOURCE[0]}")/api_key.sh"
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m megatron_bpd.train --config "$config" \
  "rollout.servers=[http://${SERVE_HOST:-127.0.0.1}:30000]" "teacher.servers=[http://${SERVE_HOST:-127.0.0.1}:30001]" "$@"
