"""The dependency direction of DESIGN.md, read from the imports: a family never imports another family."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "notelab"
TIER = {
    "core": 0,
    "data": 1,
    "train": 1,
    "eval": 1,
    "diffusion": 2,
    "flows": 2,
    "vq": 3,  # its prior is a notelab.lm Llama over code indices (DESIGN.md: tier 2, like oad)
    "seq": 2,
    "lm": 2,
    "peft": 2,
    "oad": 3,
    "hallucination": 3,
    "reproduce": 4,
    "cli": 4,
}
SAME_TIER_OK = {0, 1, 4}  # within core; among data/train/eval; reproduce <-> cli


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            pkg = path.relative_to(ROOT).parts[:-1]
            base = list(pkg[: len(pkg) - node.level + 1])
            out.append((node.lineno, ".".join(["notelab", *base, *([node.module] if node.module else [])])))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        own = path.relative_to(root).parts[0].removesuffix(".py")
        if own not in TIER:
            continue
        for lineno, module in _imports(path):
            parts = module.split(".")
            if parts[0] != "notelab" or len(parts) < 2 or parts[1] not in TIER or parts[1] == own:
                continue
            other = parts[1]
            if TIER[other] > TIER[own] or (TIER[other] == TIER[own] and TIER[own] not in SAME_TIER_OK):
                bad.append(f"{path.relative_to(root)}:{lineno} ({own}) imports {module} ({other})")
    return bad


def test_no_import_against_the_layering():
    assert violations() == []


def test_the_checker_catches_a_family_importing_another(tmp_path):
    (tmp_path / "diffusion").mkdir()
    (tmp_path / "diffusion" / "x.py").write_text("from notelab.lm.model import Llama\nfrom notelab.core import EMA\n")
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "y.py").write_text("import notelab.train\n")
    bad = violations(tmp_path)
    assert len(bad) == 2
    assert any("imports notelab.lm.model" in b for b in bad)
    assert any("imports notelab.train" in b for b in bad)
