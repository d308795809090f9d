"""megatron-bpd: on-policy distillation with blockwise policy-drift gating for Megatron-Core.

Layers (each depends only on those above it in this list):
  gating, losses          pure math on tensors (no torch.distributed, no Megatron, no HTTP)
  ops                     the C++/CUDA extension behind the gate, with its PyTorch reference
  vocab_parallel, parallel  ops on vocab-sharded logits, process groups, CP layout, the CPU shim
  models                  Qwen3 on Megatron-Core and the HF <-> Megatron weight mapping
  rollout, serve          SGLang-protocol client and the embedded server
  train                   the distillation trainer and its entry points
"""

__version__ = "0.1.0"
