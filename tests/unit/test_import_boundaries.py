"""The maths stays pure and Ray stays at the edges."""

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
    pure = [
        *PKG.glob("growth/*.py"),
        *PKG.glob("distill/*.py"),
        *PKG.glob("eval/*.py"),
        PKG / "downstream/tasks.py",
        PKG / "data/packing.py",
        PKG / "data/sources.py",
        PKG / "stage/schedule.py",
        PKG / "stage/step.py",
        PKG / "flops.py",
        PKG / "config/schema.py",
        PKG / "config/load.py",
    ]
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


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_inside_the_package():
    """Every import of the package's own modules, at the top or inside a function, forms no cycle: each module
    can be read after the modules it uses (a function-local import is no licence for a circle).

    Importing ``a.b.c`` first runs the ``__init__`` of ``a`` and ``a.b``: a module depends on its parent
    packages too, so a package whose ``__init__`` re-exports a module that comes back to the package is a
    cycle (``import ray_lifelong.models.build`` on its own failed that way)."""
    graph = {}
    for path in PKG.rglob("*.py"):
        own = {m for m in imports(path) if m.startswith("ray_lifelong")}
        # `from ray_lifelong.x import y` may name a submodule y: count the package x itself
        own |= {".".join(m.split(".")[:i]) for m in own for i in range(2, m.count(".") + 1)}
        me = _module(path)
        graph[me] = {m for m in own if m != me and not me.startswith(m + ".")}
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_the_data_pipelines_modules_import_neither_torch_nor_the_config():
    """Ray Data's actors (the split coordinator, Ray Train's dataset manager, the tokenizer pool) unpickle the
    stream's plan and so import ``ray_lifelong.data.stream``: each new one per stage would pay torch's import
    (about 2 CPU-seconds) if the module reached it, through the config or the masking."""
    import subprocess
    import sys

    code = ("import sys, ray_lifelong.data.stream; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ray_lifelong.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
