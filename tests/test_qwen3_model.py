"""Qwen3 on Megatron-Core: config for every released size, the mapping's inverse, and logits parity with
transformers' Qwen3ForCausalLM (float32, eager attention) at TP1, TP2 and PP2 with the local layer spec on the CPU,
and (``-m gpu``) with Transformer Engine's layer spec on a GPU."""

import pytest
import torch

from distributed import run_distributed
from megatron_bpd.models.qwen3 import (
    SIZES, Qwen3Arch, hf_shapes, hf_tensors, megatron_shard, qwen3_hf_config, tensor_maps, transformer_config,
)
from megatron_bpd.models.tiny import make_tiny_qwen3

# tied, vocab padded 1000 -> 1024, 2 KV groups, heads*head_dim != hidden; untied, 1100 -> 1152, 4 KV groups
TINY = {
    "tied": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, ffn=128, vocab=1000, tied=True, seed=1),
    "untied": dict(layers=4, hidden=96, heads=8, kv_heads=4, head_dim=16, ffn=160, vocab=1100, tied=False, seed=2),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {name: str(make_tiny_qwen3(root / name, **kw)) for name, kw in TINY.items()}


@pytest.mark.parametrize("size", list(SIZES))
def test_transformer_config_for_every_size(size):
    layers, hidden, heads, ffn, tied = SIZES[size]
    arch = Qwen3Arch.from_hf(qwen3_hf_config(size))
    config = transformer_config(arch, tp=8, pp=4, params_dtype=torch.bfloat16)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.ffn_hidden_size) == (
        layers, hidden, heads, ffn)
    assert config.kv_channels == 128 and config.num_query_groups == 8 and config.qk_layernorm
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and not config.add_bias_linear
    assert arch.tied_embeddings == tied and arch.rope_theta == 1e6
    assert [arch.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [151936] * 4  # TP-independent
    assert len(hf_shapes(arch)) == 2 + (not tied) + 11 * layers


def test_rope_theta_from_transformers_4_and_5_configs():
    v5 = qwen3_hf_config("8B", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    v4 = qwen3_hf_config("8B", rope_theta=5e5, rope_scaling=None, torch_dtype="bfloat16")
    del v4["rope_parameters"], v4["dtype"]
    assert Qwen3Arch.from_hf(v5).rope_theta == Qwen3Arch.from_hf(v4).rope_theta == 5e5
    assert Qwen3Arch.from_hf(v4).dtype == torch.bfloat16


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="not a dense Qwen3 model.*LlamaForCausalLM"):
        Qwen3Arch.from_hf(qwen3_hf_config("8B", architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(ValueError, match="not a dense Qwen3 model"):
        Qwen3Arch.from_hf(qwen3_hf_config("8B", architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"))
    with pytest.raises(ValueError, match="TP=16 does not divide the 8 KV groups"):
        transformer_config(Qwen3Arch.from_hf(qwen3_hf_config("32B")), tp=16)
    with pytest.raises(ValueError, match="PP=3 does not divide num_hidden_layers=64"):
        Qwen3Arch.from_hf(qwen3_hf_config("32B")).check_layout(1, 3)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tied", [True, False])
def test_mapping_shards_invert(tp, tied):
    """megatron_shard over all TP ranks followed by hf_tensors gives back every HF tensor exactly once."""
    arch = Qwen3Arch.from_hf(dict(qwen3_hf_config("0.6B", tie_word_embeddings=tied), num_hidden_layers=2,
                                  vocab_size=1000, hidden_size=32, intermediate_size=48, head_dim=8,
                                  num_attention_heads=8, num_key_value_heads=4, dtype="float32"))
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=gen) for name, shape in hf_shapes(arch).items()}
    padded = arch.padded_vocab_size(tp)

    def read(name, dim, start, stop):
        return hf[name].narrow(dim, start, stop - start)

    seen = []
    for tm in tensor_maps(arch):
        shards = [megatron_shard(tm, arch, read, r, tp, padded) for r in range(tp)]
        if tm.kind == "vocab":
            assert shards[0].shape[0] * tp == padded and not shards[-1][1000 - padded:].any()
        if tm.tied:
            continue
        for name, tensor in hf_tensors(tm, arch, shards).items():
            assert torch.equal(tensor, hf[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(hf)


def forward_logits(model, tokens):
    """Full-vocab logits [b, s, V_padded] of ``model`` at the current TP/PP on the last stage (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)

    def step(_, model):
        return model(tokens, positions, attention_mask=None), lambda out, non_loss_data=True: out

    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = out[0].contiguous()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _megatron_logits(rank, world, dirs, tokens, layouts, transformer_impl=None):
    """Logits of every tiny model at every layout of ``layouts`` (name -> (tp, pp)), on this rank's compute device
    (the CPU, or its GPU), as numpy arrays on the last stage."""
    from megatron_bpd import parallel
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights

    out = {}
    for layout, (tp, pp) in layouts.items():
        parallel.initialize(tp=tp, pp=pp, seed=0)
        for name, hf_dir in dirs.items():
            model = build_model(hf_dir, transformer_impl=transformer_impl)
            assert transformer_impl is None or model.qwen3.te == (transformer_impl == "transformer_engine")
            load_hf_weights(model, hf_dir, progress=False)
            model.eval()
            with torch.no_grad():
                logits = forward_logits(model, tokens[name].to(parallel.compute_device()))
            if logits is not None:  # numpy: by value, a shared tensor dies with its process
                out[layout, name] = logits.cpu().numpy()
    parallel.destroy()
    return out


def _parity_inputs(tiny_dirs):
    """(tokens [2, 11] per model, transformers' float32 logits per model)."""
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(3)
    tokens = {name: torch.randint(0, TINY[name]["vocab"], (2, 11), generator=gen) for name in TINY}
    ref = {}
    for name, hf_dir in tiny_dirs.items():
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            ref[name] = hf(tokens[name]).logits
    return tokens, ref


@pytest.fixture(scope="module")
def parity(tiny_dirs):
    """(Megatron logits per layout and model from the last rank, transformers logits per model); TP1 runs with
    DP2."""
    tokens, ref = _parity_inputs(tiny_dirs)
    got = run_distributed(_megatron_logits, 2, tiny_dirs, tokens, LAYOUTS)[-1]  # rank 1: the last stage everywhere
    return got, ref


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(TINY))
def test_logits_match_transformers(parity, tiny_dirs, layout, name):
    got, ref = parity
    logits, vocab = torch.from_numpy(got[layout, name]), TINY[name]["vocab"]
    assert logits.shape[-1] == Qwen3Arch.from_hf(tiny_dirs[name]).padded_vocab_size(LAYOUTS[layout][0]) > vocab
    diff = (logits[..., :vocab] - ref[name]).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"
    assert ref[name].abs().max() > 1  # logits are O(1): the comparison is not trivially small


# Transformer Engine may run float32 GEMMs in TF32 (10-bit significand: inputs rounded by up to 2^-11 relative), which
# moves these O(1-10) logits by ~1e-3; a wrong weight mapping moves them by O(1).
TE_LOGITS_TOL = 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(TINY))
def test_transformer_engine_spec_logits_match_transformers(tiny_dirs, name, record_property):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    tokens, ref = _parity_inputs({name: tiny_dirs[name]})
    got = run_distributed(_megatron_logits, 1, {name: tiny_dirs[name]}, tokens, {"tp1": (1, 1)},
                          "transformer_engine")[0]
    logits, vocab = torch.from_numpy(got["tp1", name]), TINY[name]["vocab"]
    diff = (logits[..., :vocab] - ref[name]).abs().max().item()
    record_property("max_abs_diff_vs_transformers", diff)
    assert diff <= TE_LOGITS_TOL, f"max abs diff {diff}"
    assert ref[name].abs().max() > 1


def test_make_tiny_tool_writes_a_folder_transformers_loads(tmp_path):
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_qwen3 import main

    main(["--out", str(tmp_path), "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
          "--head-dim", "16", "--ffn", "64", "--vocab", "400", "--untied", "--seed", "7"])
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 12 + 30."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nCompute 12 + 30.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text and len(tok) <= 400
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not model.config.tie_word_embeddings and model(ids).logits.shape == (1, ids.shape[1], 400)
    assert Qwen3Arch.from_hf(tmp_path).padded_vocab_size(1) == 512
