"""Task tokenizer and random task models: tiny Qwen3 folders whose tokenizer fits the addition task.

The tokenizer is a byte-level BPE like ``megatron_bpd.models.tiny``'s (same special tokens, ids 0..2, same chat
template) but every digit is its own pre-token (as in Qwen's tokenizer) and the merges are learned on task text,
so " write", " carry", "answer", ":" and the newline are single tokens and any text still round-trips exactly.
The model folder is written by ``make_tiny_qwen3`` (config, weights, generation config) and its tokenizer files
are then replaced by the task tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Union

from megatron_bpd.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, make_tiny_qwen3
from megatron_bpd.tasks.registry import get_task

TOKENIZER_VOCAB = 320  # bytes (256) + specials (3) + the merges the task text needs (fewer are used)


def train_task_tokenizer(vocab_size: int = TOKENIZER_VOCAB, seed: int = 0, task: str = "addition"):
    """A ``tokenizers.Tokenizer``: digits split one per token, byte-level BPE merges trained on ``task``'s text
    (trained once per process and arguments, a fresh object every call)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed, task))


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, seed: int, task: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(get_task(task).corpus(seed), trainer=trainer)
    return tok.to_str()


def task_tokenizer(vocab_size: int = TOKENIZER_VOCAB, seed: int = 0, task: str = "addition"):
    """The task tokenizer as a transformers ``PreTrainedTokenizerFast`` with the tiny models' chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_task_tokenizer(vocab_size, seed, task), eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_task_model(out_dir: Union[str, Path], *, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, head_dim: int = 16, ffn: int = 256, tied: bool = True, seed: int = 0,
                    tokenizer_seed: int = 0, task: str = "addition") -> Path:
    """A random Qwen3ForCausalLM folder with ``task``'s tokenizer (vocab = tokenizer size rounded up to 16)."""
    tok = task_tokenizer(seed=tokenizer_seed, task=task)
    vocab = max(260, -(-len(tok) // 16) * 16)
    out = make_tiny_qwen3(out_dir, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          ffn=ffn, vocab=vocab, tied=tied, seed=seed, dtype="float32")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    tok.save_pretrained(out)
    # make_tiny_qwen3 took bos/eos/pad ids from its own tokenizer: the specials have the same ids here
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) == SPECIAL_TOKENS.index(t), t
    return out
