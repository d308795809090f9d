"""The package's layers (megatron_bpd/__init__.py, docs of the architecture) import one way: every import in a
module, at the top or inside a function, is read from its source, so a cycle hidden by a local import fails too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_bpd"

# module prefix -> what it must never import (its own layer or a higher one; third-party stacks it must not need)
LAYER_1 = ("torch.distributed", "megatron", "aiohttp", "megatron_bpd.parallel", "megatron_bpd.train",
           "megatron_bpd.rollout", "megatron_bpd.serve", "megatron_bpd.vocab_parallel")
FORBIDDEN = {
    "megatron_bpd.drift_controls": LAYER_1,
    "megatron_bpd.gating": LAYER_1,
    "megatron_bpd.losses": LAYER_1,
    "megatron_bpd.tasks": ("torch.distributed", "megatron", "aiohttp", "megatron_bpd.train", "megatron_bpd.rollout",
                           "megatron_bpd.serve"),
    "megatron_bpd.rollout": ("megatron_bpd.serve", "megatron_bpd.train", "megatron", "megatron_bpd.parallel"),
    "megatron_bpd.serve": ("megatron_bpd.train", "megatron", "megatron_bpd.parallel"),
    "megatron_bpd.vocab_parallel": ("megatron_bpd.train", "megatron_bpd.rollout", "megatron_bpd.serve"),
    "megatron_bpd.parallel": ("megatron_bpd.train", "megatron_bpd.rollout", "megatron_bpd.serve"),
}


def imports(path: Path, module: str):
    """Every module name ``path`` imports, relative imports resolved against ``module``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_a_higher_one(layer):
    bad = []
    for path, module in modules():
        if module == layer or module.startswith(layer + "."):
            for name in imports(path, module):
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                    bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_import_reader_sees_local_and_relative_imports(tmp_path):
    path = tmp_path / "servers.py"
    path.write_text("import os\ndef f():\n    from ..serve.launch import EmbeddedServer\n")
    assert set(imports(path, "megatron_bpd.rollout.servers")) >= {"os", "megatron_bpd.serve.launch",
                                                                   "megatron_bpd.serve.launch.EmbeddedServer"}


def test_loading_and_checking_a_config_imports_neither_torch_nor_aiohttp():
    """The config tree (train/config.py with the method's settings from method_config.py) loads and validates
    without the heavy stacks, so --dry-run and tools can check configs anywhere."""
    import subprocess
    import sys

    code = ("import sys; from megatron_bpd.train.config import load_config; "
            "load_config(None, ['loss.kind=topk_lsm', 'loss.gate.block_size=16', 'loss.drift_control.kind=m2po']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'aiohttp', 'megatron', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"
