"""``python -m megatron_bpd.train --config CONFIG.yaml [key.sub=value ...]`` (also ``megatron-bpd train``).

Run it under torchrun for several processes (``torchrun --nproc-per-node 8 -m megatron_bpd.train --config ...``)
or as one plain process. ``--dry-run --world-size N`` checks a config and its parallel layout for N processes
without starting anything (used to validate the example configs).
"""

import argparse

from .config import load_config
from .layout import check_layout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megatron-bpd train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of a TrainConfig")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.dir's latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="check the config and layout, then exit")
    parser.add_argument("--world-size", type=int, default=None, help="processes of the dry run's layout")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    config = load_config(args.config, overrides)
    if args.dry_run:
        print(check_layout(config, args.world_size or 1))
        return None
    from .trainer import Trainer

    Trainer(config).run()
    return config


if __name__ == "__main__":
    main()
