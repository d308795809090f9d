"""``make_tiny_qwen3``: a tiny random Qwen3 model folder in Hugging Face format, made offline (tests, CPU demo).

The folder holds config.json, model.safetensors, generation_config.json and a byte-level BPE tokenizer trained in
about a second on a generated corpus (tokenizer.json, tokenizer_config.json with a Qwen-style chat template);
transformers' AutoModelForCausalLM / AutoTokenizer load it without the hub.
"""

import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_WORDS = ("the answer is so we get then let compute find sum product of and a number integer solve equation "
          "prime square root value total each step first next therefore since because user assistant think").split()


def _corpus(seed: int, lines: int = 4000) -> "list[str]":
    """Generated English-and-arithmetic text, the same for a given seed on every machine."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"{words.capitalize()}: {a} + {b} = {a + b}, {a} * {b} = {a * b}. \\boxed{{{a + b}}}\n")
    return out


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens (incl. the Qwen chat specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return tok


def make_tiny_qwen3(
    out_dir: "str | Path",
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    ffn: int = 128,
    vocab: int = 1000,
    tied: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random Qwen3ForCausalLM with these sizes to ``out_dir``; returns the folder.

    Weights are drawn from a generator seeded with ``seed`` (matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.25),
    norm weights ~ 1 + N(0, 0.01)) so that logits are O(1) and every tensor matters. ``vocab`` must exceed 259
    (256 bytes + 3 specials); the tokenizer may hold fewer tokens than ``vocab``, as Qwen's does.
    """
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if vocab < 260:
        raise ValueError(f"vocab={vocab}: a byte-level tokenizer needs at least 260 tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab, seed), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tok.save_pretrained(out)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tied, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1:
                param.copy_(1 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out
