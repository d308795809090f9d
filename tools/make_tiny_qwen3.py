"""Write a tiny random Qwen3 model folder in Hugging Face format (weights, config, offline BPE tokenizer with a
chat template) for tests and the CPU demo.

    python tools/make_tiny_qwen3.py --out DIR [--layers 2 --hidden 64 --heads 4 --kv-heads 2 --vocab 1000 --seed 0]
"""

import argparse

from megatron_bpd.models.tiny import make_tiny_qwen3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (default: tied embeddings)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_qwen3(
        args.out, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, ffn=args.ffn, vocab=args.vocab, tied=not args.untied, seed=args.seed, dtype=args.dtype,
    )
    print(out)


if __name__ == "__main__":
    main()
