"""Export a Megatron-Core Qwen3 checkpoint (from convert_hf_qwen3.py or the trainer) to a Hugging Face folder:
safetensors + config.json + tokenizer files, loadable by transformers and SGLang.

    python tools/export_hf_qwen3.py --megatron CKPT_DIR --out HF_DIR [--tp 1 --pp 1]

--tp/--pp choose the layout the checkpoint is loaded at (any the model allows; more ranks, less memory each).
"""

import argparse

from megatron_bpd.models.qwen3 import export_megatron_to_hf, run_parallel


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron", required=True, help="checkpoint folder written by megatron_bpd")
    parser.add_argument("--out", required=True, help="output HF model folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load the checkpoint at")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GiB)")
    args = parser.parse_args(argv)
    run_parallel(export_megatron_to_hf, args.tp, args.pp, args.megatron, args.out,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))


if __name__ == "__main__":
    main()
