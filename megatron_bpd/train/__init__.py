"""Training: the micro-batch, the gated OPD loss on vocab-parallel logits, and Megatron's forward step."""
