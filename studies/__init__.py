"""The studies behind docs/results: each trains its runs through ``megatron_bpd.experiment``, keeps them in one
compressed file (``archive``) and regenerates its report from it (the shared skeleton: ``study``). Run one from the
repository root as ``python -m studies.<name> --out FOLDER ...`` (``--help`` for its options)."""
