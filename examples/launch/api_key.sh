# Sourced by the launch scripts (serve_sglang.sh, train_torchrun.sh, ../slurm/distill.sbatch): sets and exports
# $SGLANG_API_KEY, the key every SGLang server and the sglang-router require (--api-key) and the trainer sends
# (rollout.api_key / teacher.api_key default to $SGLANG_API_KEY). When it is not set, the key is read from
# $SGLANG_API_KEY_FILE (default ~/.config/megatron-bpd/sglang_api_key: keep it on the filesystem the nodes share),
# which is generated (random, mode 600) when missing. The key is never printed.
if [[ -z ${SGLANG_API_KEY:-} ]]; then
  sglang_key_file=${SGLANG_API_KEY_FILE:-$HOME/.config/megatron-bpd/sglang_api_key}
  if [[ ! -s $sglang_key_file ]]; then
    mkdir -p "$(dirname "$sglang_key_file")"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$sglang_key_file")
    echo "[api_key] generated an SGLang API key in $sglang_key_file" >&2
  fi
  SGLANG_API_KEY=$(<"$sglang_key_file")
fi
export SGLANG_API_KEY

# healthy URL: does URL/health answer? (the key goes to curl on stdin, so it is not on a command line others see)
healthy() {
  curl -sf -K - "$1/health" >/dev/null <<<"header = \"Authorization: Bearer $SGLANG_API_KEY\""
}
