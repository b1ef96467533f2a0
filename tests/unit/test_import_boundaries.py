"""The maths stays pure and Ray stays at the edges (shared/specs/style.md, practice 1 and 9)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "ray_lifelong"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pure_modules_import_no_ray():
    pure = [*PKG.glob("growth/*.py"), *PKG.glob("distill/*.py"), *PKG.glob("eval/*.py"), PKG / "downstream/tasks.py",
            PKG / "data/packing.py", PKG / "data/sources.py", PKG / "stage/schedule.py", PKG / "stage/step.py",
            PKG / "flops.py",
            PKG / "config/schema.py", PKG / "config/load.py"]
    for path in pure:
        bad = {m for m in imports(path) if m == "ray" or m.startswith("ray.")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_trainers_are_built_in_two_places_and_ray_init_only_at_the_edge():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if "TorchTrainer(" in text:  # a pre-training stage, and a downstream fine-tuning run
            assert path.relative_to(PKG).as_posix() in ("stage/run.py", "downstream/run.py"), path
        if "ray.init(" in text:
            assert path.name == "cli.py", path
