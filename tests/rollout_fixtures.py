"""Shared helpers for the rollout/serve tests: a tiny random Qwen3 checkpoint and embedded-server processes on
127.0.0.1."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import torch

from megatron_bpd.rollout.embedded import EmbeddedServer, free_port  # noqa: F401  (free_port: used by the tests)

VOCAB, EOS = 300, 2


def make_tiny_qwen3(path: Path, seed: int = 0) -> Path:
    """2 layers, hidden 64, 4 heads / 2 KV heads of 16, vocab 300; saved with save_pretrained (no tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # sharper distributions than the default init, so sampling tests have signal
        model.lm_head.weight.mul_(15.0)
    model.save_pretrained(path)
    return path


def add_tokenizer(path: Path) -> Path:
    """A byte-level BPE of VOCAB tokens trained on a few lines, saved as a PreTrainedTokenizerFast."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog\n"] * 50 + ["hello world, stop here."] * 50,
                            trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return path


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def server(model: Path, log_dir: Path, *extra: str) -> EmbeddedServer:
    """``python -m megatron_bpd.serve`` on 127.0.0.1:<free port>, spawned (not yet healthy)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    s = EmbeddedServer(model, extra_args=["--log-level", "warning", *extra], env=env)
    s.log_path = Path(log_dir) / f"server-{s.port}.log"
    return s.spawn()


def start_servers(model: Path, log_dir: Path, count: int, *extra: str) -> list[EmbeddedServer]:
    """Start ``count`` servers in parallel (imports dominate start-up) and wait for all."""
    servers = [server(model, log_dir, *extra) for _ in range(count)]
    try:
        return [s.wait_healthy() for s in servers]
    except BaseException:
        for s in servers:
            s.stop()
        raise


def _internal_state(url: str, key: str) -> int:
    import json

    with urllib.request.urlopen(f"{url}/server_info", timeout=10) as r:
        return json.loads(r.read())["internal_states"][0][key]


def num_finished(url: str) -> int:
    """Sequences a server has finished so far (from /server_info)."""
    return _internal_state(url, "num_finished")


def num_running(url: str) -> int:
    """Sequences a server is generating or holding in its queue now."""
    return _internal_state(url, "num_requests")
