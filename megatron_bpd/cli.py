"""``megatron-bpd COMMAND ...``: train, demo, serve, eval."""

import importlib
import sys

COMMANDS = {
    "train": ("megatron_bpd.train.__main__", "distill a student (torchrun-able)"),
    "demo": ("megatron_bpd.demo", "the complete CPU distillation demo"),
    "serve": ("megatron_bpd.serve.cli", "serve an HF Qwen3 folder over SGLang's HTTP protocol"),
    "eval": ("megatron_bpd.eval.cli", "pass@k on AIME24/AIME25/AMC23/MATH500"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:6s} {help}" for name, (_, help) in COMMANDS.items())
        print(f"usage: megatron-bpd COMMAND [args]\n\ncommands:\n{lines}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
