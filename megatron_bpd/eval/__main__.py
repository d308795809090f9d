import sys

from megatron_bpd.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
