"""DESIGN.md's layering: kernels <- model <- generation <- trainers <- cli; rl <- trainers;
distributed <- trainers/cli. No subpackage imports one above it; `import rlhf_fast` stays cheap."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rlhf_fast"

LEAVES = {"config", "errors"}  # rlhf_fast/config.py, errors.py: import nothing else from rlhf_fast, usable everywhere

ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "generation": {"kernels", "model"},
    "rl": {"kernels"},
    "data": set(),
    "distributed": set(),
    "trainers": {"kernels", "model", "generation", "rl", "data", "distributed"},
    "benchmarking": {"kernels", "model", "generation", "rl", "data", "distributed", "trainers"},
    "serving": {"kernels", "model", "generation", "data", "trainers"},
    "evaluation": {"kernels", "model", "generation", "rl", "data", "trainers"},
}


def _imported_subpackages(path: Path, subpackage: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level == 1:  # from .x import y: inside this subpackage
                continue
            else:  # from ..x import y
                names = ["rlhf_fast." + (node.module or "")]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rlhf_fast" and len(parts) > 1 and parts[1] != subpackage:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_no_upward_imports(subpackage):
    for path in sorted((PKG / subpackage).rglob("*.py")):
        bad = _imported_subpackages(path, subpackage) - ALLOWED[subpackage] - LEAVES
        assert not bad, f"{path.relative_to(PKG.parent)} imports rlhf_fast.{sorted(bad)}: against DESIGN.md layering"


def test_import_is_cheap():
    code = (
        "import sys, rlhf_fast, rlhf_fast.kernels, rlhf_fast.model, rlhf_fast.data, rlhf_fast.rl\n"
        "heavy = [m for m in ('deepspeed', 'transformers', 'datasets', 'flash_attn', 'triton') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing rlhf_fast pulls in {out.stdout.strip()}"
