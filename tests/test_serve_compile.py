"""The embedded server's compiled decode step (``Qwen3Runner(model, compile=True)``, the server's ``--compile``)
against the eager one: the same logits within float32 rounding over changing batch sizes and context lengths, and
weight updates copied into the parameters after compilation reach the compiled step (the fused q/k/v and gate/up
weights are views of the parameters)."""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_bpd.serve.runner import Qwen3Runner
from megatron_bpd.serve.weights import load_model, load_named_tensors
from rollout_fixtures import make_tiny_qwen3

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")


def test_compiled_decode_matches_eager_and_sees_weight_updates(tmp_path):
    model_dir = make_tiny_qwen3(tmp_path / "model")
    eager = Qwen3Runner(load_model(str(model_dir))[0])
    compiled = Qwen3Runner(load_model(str(model_dir))[0], compile=True)  # a model of its own: runners fuse weights
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 9, 3, 12, 7])
    prompts = torch.randint(3, 300, (5, 12), generator=g)
    caches = [eager.new_cache(8), compiled.new_cache(8)]
    for runner, cache in zip((eager, compiled), caches):
        runner.forward(cache, list(range(5)), prompts, lens)
    for batch in [5] * 4 + [3] * 3 + [1, 2]:  # batch 1 runs eagerly in both
        tokens = torch.randint(3, 300, (batch,), generator=g)
        want, got = (runner.decode(cache, tokens) for runner, cache in zip((eager, compiled), caches))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.equal(caches[1].lengths, caches[0].lengths)

    tokens = torch.randint(3, 300, (2,), generator=g)
    cache = caches[1]
    with torch.inference_mode():  # the compiled cache before the next step, to run that step twice
        saved = [t.clone() for t in cache.keys], [t.clone() for t in cache.values], cache.lengths.clone()
    before = compiled.decode(cache, tokens)
    cache.keys, cache.values, cache.lengths = saved
    update = {name: torch.randn(p.shape, generator=g) * 0.3 for name, p in eager.model.named_parameters()
              if name.endswith(("layers.1.self_attn.k_proj.weight", "layers.1.mlp.up_proj.weight"))}
    assert len(update) == 2
    for runner in (eager, compiled):
        load_named_tensors(runner.model, update, "test")
    want, got = (runner.decode(cache, tokens) for runner, cache in zip((eager, compiled), caches))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - before).abs().max() > 0.1  # the update changed the compiled step's output
