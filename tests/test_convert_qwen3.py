"""HF -> Megatron torch_dist -> HF with the tools (bit-exact, across layouts, single and sharded safetensors) and
the errors bad inputs give."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import run_distributed
from megatron_bpd.models.qwen3.hf_io import HFReader, HFWriter, copy_side_files
from megatron_bpd.models.tiny import make_tiny_qwen3

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")

TINY = {  # tied bf16 in one file; untied fp32 in shards with an index
    "tied": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, ffn=128, vocab=1000, tied=True,
                 dtype="bfloat16", seed=4),
    "untied": dict(layers=4, hidden=96, heads=8, kv_heads=4, head_dim=16, ffn=160, vocab=1100, tied=False, seed=5),
}
CONVERT = {"tied": ("2", "1"), "untied": ("1", "2")}  # (tp, pp) of the conversion
EXPORT = {"tied": ("1", "2"), "untied": ("2", "1")}  # a different layout for the export


def _hf_tensors(hf_dir) -> dict:
    reader = HFReader(hf_dir)
    return {name: reader.read(name, 0, 0, reader.shape(name)[0]) for name in reader.files}


def _reshard(src, dst, max_shard_bytes):
    writer = HFWriter(dst, max_shard_bytes)
    for name, tensor in sorted(load_file(f"{src}/model.safetensors").items()):
        writer.add(name, tensor)
    writer.close()
    shutil.copyfile(f"{src}/config.json", f"{dst}/config.json")
    copy_side_files(src, dst)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name, kw in TINY.items():
        out[name] = make_tiny_qwen3(root / f"{name}-src", **kw)
    _reshard(out["untied"], root / "untied", max_shard_bytes=200_000)
    out["untied"] = root / "untied"
    assert len(set(HFReader(out["untied"]).files.values())) > 1
    # broken copies of the tied model: a tensor missing, a tensor of the wrong shape
    tensors = load_file(out["tied"] / "model.safetensors")
    for broken, edit in [("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                         ("misshapen", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                           torch.zeros(32, 64, dtype=torch.bfloat16)}))]:
        (root / broken).mkdir()
        shutil.copyfile(out["tied"] / "config.json", root / broken / "config.json")
        copy = dict(tensors)
        edit(copy)
        save_file(copy, root / broken / "model.safetensors")
        out[broken] = root / broken
    out["root"] = root
    return {k: str(v) for k, v in out.items()}


def _convert_and_export(rank, world, dirs):
    """Run the two tools in place (run_parallel sees RANK) over two processes: convert each model, export it at
    another layout; then feed the broken checkpoints to the converter and report its errors."""
    sys.path.insert(0, TOOLS)
    from convert_hf_qwen3 import main as convert
    from export_hf_qwen3 import main as export

    for name in TINY:
        ckpt, out = f"{dirs['root']}/{name}-megatron", f"{dirs['root']}/{name}-export"
        tp, pp = CONVERT[name]
        convert(["--hf", dirs[name], "--out", ckpt, "--tp", tp, "--pp", pp])
        tp, pp = EXPORT[name]
        export(["--megatron", ckpt, "--out", out, "--tp", tp, "--pp", pp, "--max-shard-gb", str(300_000 / 2**30)])
    errors = {}
    for broken in ("missing", "misshapen"):
        try:
            convert(["--hf", dirs[broken], "--out", f"{dirs['root']}/{broken}-megatron", "--tp", "2"])
        except ValueError as e:
            errors[broken] = str(e)
    return errors


@pytest.fixture(scope="module")
def converted(dirs):
    return run_distributed(_convert_and_export, 2, dirs)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_round_trip_is_bit_exact(dirs, converted, name):
    src, out = dirs[name], f"{dirs['root']}/{name}-export"
    before, after = _hf_tensors(src), _hf_tensors(out)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and after[key].shape == tensor.shape, key
        assert torch.equal(after[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert json.loads(open(f"{out}/config.json").read()) == json.loads(open(f"{src}/config.json").read())
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert open(f"{out}/{side}", "rb").read() == open(f"{src}/{side}", "rb").read(), side


@pytest.mark.slow
def test_export_loads_in_transformers(dirs, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = f"{dirs['root']}/untied-export"
    assert len(set(HFReader(out).files.values())) > 1  # written as shards with an index
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(dirs["untied"], dtype=torch.float32)(ids).logits
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_bad_checkpoints_fail_clearly(converted):
    assert "lacks 1 tensor(s)" in converted["missing"] and "model.layers.1.mlp.up_proj.weight" in converted["missing"]
    assert "shape mismatch: model.layers.0.self_attn.k_proj.weight is [32, 64]" in converted["misshapen"]
    assert "implies [64, 64]" in converted["misshapen"]


def test_converter_rejects_bad_configs_before_starting(dirs, tmp_path):
    sys.path.insert(0, TOOLS)
    from convert_hf_qwen3 import main as convert

    with pytest.raises(ValueError, match="TP=4 does not divide the 2 KV groups"):
        convert(["--hf", dirs["tied"], "--out", str(tmp_path / "x"), "--tp", "4"])
    llama = json.loads(open(f"{dirs['tied']}/config.json").read())
    llama.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match=r"not a dense Qwen3 model: architectures=\['LlamaForCausalLM'\]"):
        convert(["--hf", str(tmp_path), "--out", str(tmp_path / "x")])
