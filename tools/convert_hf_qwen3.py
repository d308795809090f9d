"""Convert a Hugging Face Qwen3 checkpoint folder to a Megatron-Core distributed checkpoint (torch_dist).

    python tools/convert_hf_qwen3.py --hf HF_DIR --out OUT_DIR --tp 2 --pp 2

Runs tp*pp ranks (spawned locally, or the torchrun job it is started in); each reads only its own shards from the
safetensors. The result loads at any TP/PP the model allows (``megatron_bpd.models.qwen3.build_from_checkpoint``).
"""

import argparse

from megatron_bpd.models.qwen3 import Qwen3Arch, convert_hf_to_megatron, run_parallel


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the converting job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the converting job")
    parser.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                        help="layer spec whose parameter names the checkpoint uses (default: TE where installed)")
    args = parser.parse_args(argv)
    Qwen3Arch.from_hf(args.hf).check_layout(args.tp, args.pp)  # fail before starting any process
    run_parallel(convert_hf_to_megatron, args.tp, args.pp, args.hf, args.out, transformer_impl=args.transformer_impl)


if __name__ == "__main__":
    main()
