"""Model families megatron-bpd trains: builders, weight mapping and checkpoint conversion."""
