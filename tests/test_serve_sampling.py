"""The embedded server's batched sampler: what it guarantees for a sequence's tokens.

1. A sampled token's distribution is exactly the top-k / top-p filtered distribution: over a grid of uniforms
   u_j = (j + 0.5) / N, the share of u mapped to each token equals its filtered probability (float64 reference)
   within 1 / N, since inverse-CDF sampling maps an interval of u of that length to each token.
2. Log-probs are log_softmax(logits / T) over the full vocabulary, before filtering; greedy rows take the argmax.
3. A sequence's tokens depend only on its seed and its logits: the same seed gives the same tokens alone and in a
   full batch of other rows, whatever its slot.
"""

from __future__ import annotations

import pytest
import torch

from megatron_bpd.serve.sampling import SamplingRow, SlotSampling, sample

V, GRID = 200, 4096


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 [V]: softmax(logits / T) restricted to the top_k most likely tokens and to the smallest prefix (by
    descending probability) whose mass before the token is < top_p, renormalized."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    values, order = torch.sort(probs, descending=True)
    keep = torch.ones(V, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    keep &= (torch.cumsum(values, 0) - values) < top_p
    out = torch.zeros(V, dtype=torch.float64)
    out[order[keep]] = values[keep]
    return out / out.sum()


def settings_rows():
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(V, generator=g) * 4
    flat = torch.randn(V, generator=g) * 0.1  # top-p 0.95 keeps more than the 64 ranked candidates: whole-row sort
    return [(peaked, 1.0, -1, 1.0), (peaked, 0.7, 5, 1.0), (peaked, 1.3, -1, 0.9), (peaked, 0.8, 20, 0.8),
            (flat, 1.0, -1, 0.95), (flat, 1.0, 150, 1.0), (flat, 2.0, 100, 0.5)]


@pytest.mark.parametrize("logits, temperature, top_k, top_p", settings_rows())
def test_sampled_tokens_follow_the_filtered_distribution(logits, temperature, top_k, top_p):
    u = (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID
    rows = logits.expand(GRID, V)
    tokens, _ = sample(rows, torch.full((GRID,), temperature), torch.full((GRID,), top_k),
                       torch.full((GRID,), top_p), u)
    share = torch.bincount(tokens, minlength=V).double() / GRID
    expected = reference_probs(logits, temperature, top_k, top_p)
    assert (share - expected).abs().max() <= 1 / GRID + 1e-6
    assert bool((share[expected == 0] == 0).all())  # never a filtered-out token


def test_logprobs_are_tempered_before_filtering_and_greedy_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=g) * 3
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    tokens, logprobs = sample(logits, temperature, torch.tensor([-1, 1, 3, -1]), torch.tensor([1.0, 1.0, 0.5, 0.7]),
                              torch.rand(4, generator=g, dtype=torch.float64))
    expect = torch.log_softmax(logits / torch.tensor([1.0, 0.5, 1.0, 2.0])[:, None], dim=-1)
    torch.testing.assert_close(logprobs, expect)
    assert tokens[0] == logits[0].argmax() and tokens[1] == logits[1].argmax()  # T = 0 and top_k = 1: greedy
    assert tokens[2] in logits[2].topk(3).indices


def test_a_seed_gives_the_same_tokens_alone_and_in_a_full_batch():
    g = torch.Generator().manual_seed(2)
    steps, slots = 12, 16
    logits = torch.randn(steps, slots, V, generator=g) * 2
    probe = lambda: SamplingRow(0.9, 0.9, 40, torch.Generator().manual_seed(1234))  # noqa: E731

    alone = SlotSampling(slots)
    alone.assign(0, probe(), steps)
    solo = [int(alone.sample(logits[t, 5:6], torch.tensor([0]))[0][0]) for t in range(steps)]

    full = SlotSampling(slots)
    for s in range(slots):
        row = probe() if s == 7 else SamplingRow([0.0, 1.0, 0.6][s % 3], [1.0, 0.9][s % 2], [-1, 10][s % 2],
                                                  torch.Generator().manual_seed(s))
        full.assign(s, row, steps)
    batch_logits = logits.clone()
    batch_logits[:, 7] = logits[:, 5]  # the probe sees the same logits in slot 7
    together = [int(full.sample(batch_logits[t], torch.arange(slots))[0][7]) for t in range(steps)]
    assert together == solo
    assert len(set(solo)) > 1  # really sampled

    other = SlotSampling(slots)
    other.assign(0, SamplingRow(0.9, 0.9, 40, torch.Generator().manual_seed(1235)), steps)
    assert [int(other.sample(logits[t, 5:6], torch.tensor([0]))[0][0]) for t in range(steps)] != solo


def test_n_samples_of_a_long_prompt_share_a_prefill_after_the_cache_grew(tmp_path):
    """The engine itself: a prompt longer than the cache's first capacity (the layers are reallocated) prefilled once
    for n = 3 samples, which equal the same seeds sampled one request at a time; a 4th sequence with the same prompt
    in the same admission shares the prefill too."""
    import threading

    from megatron_bpd.rollout.protocol import SamplingParams
    from megatron_bpd.serve.engine import Engine, Sequence
    from megatron_bpd.serve.weights import load_model
    from rollout_fixtures import make_tiny_qwen3

    model_dir = make_tiny_qwen3(tmp_path / "model")
    engine = Engine(lambda: load_model(str(model_dir)), max_running=8)
    engine.start()
    assert engine.loaded.wait(60)
    prompt = [(7 * i) % 290 + 3 for i in range(300)]

    def run(seeds: list[list[int]]) -> list[list[int]]:
        done = threading.Semaphore(0)
        groups = [[Sequence(rid=f"{g}-{j}", request_rid=str(g), prompt=prompt, params=SamplingParams(
            max_new_tokens=6, ignore_eos=True), sampling=SamplingRow(1.0, 0.9, -1, torch.Generator().manual_seed(s)),
            notify=lambda seq, n: done.release() if seq.finish else None) for j, s in enumerate(group)]
            for g, group in enumerate(seeds)]
        engine.submit(groups)
        for _ in range(sum(map(len, seeds))):
            assert done.acquire(timeout=60)
        assert all(seq.finish["type"] == "length" for g in groups for seq in g)
        return [seq.output_ids for g in groups for seq in g]
    try:
        together = run([[10, 11, 12], [13]])
        assert together == [run([[s]])[0] for s in (10, 11, 12, 13)]
    finally:
        engine.stop()
