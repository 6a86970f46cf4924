"""The package's imports flow one way: from the command line down to the file helpers.

Every module has a layer; an import, at module level or inside a function, may only reach a
module of the same layer or a lower one, and the import graph has no circle. A new module must
be given a layer here.
"""

import ast
from pathlib import Path

import saelib

PACKAGE = Path(saelib.__file__).parent

# bottom to top
LAYERS = [
    ["version", "paths", "files", "stats", "scaling", "notebook_engine"],
    ["normalize", "native", "kernels", "models", "texts", "data"],
    ["sae"],
    ["activations", "config", "sources"],
    ["formats", "grid"],
    ["checkpoint"],
    ["train"],
    ["distributed", "loading"],
    ["runs"],
    ["evals", "evals.ablation", "evals.downstream", "evals.heldout", "evals.n2g", "evals.probe_sources", "evals.probes",
     "evals.reconstruction"],
    ["viz", "viz.static", "viz.summary", "viz.widget", "sweep", "results", "released", "plots"],
    ["bench.cases", "bench.memory", "bench.report"],
    ["bench.peers", "bench.experiments", "bench.pipeline"],
    ["bench.quality"],
    ["cli", "bench", "bench.__main__", "__main__", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The saelib modules ``path`` imports, anywhere in it."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("saelib.") for a in node.names if a.name.startswith("saelib.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("saelib"):
                target = node.module.removeprefix("saelib").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if is_module(sub) else target or "__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts}


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYER)) == []


def test_no_import_reaches_a_higher_layer():
    upward = sorted(f"{source} -> {target}" for source, targets in graph().items() for target in targets
                    if LAYER[target] > LAYER[source])
    assert upward == []


def test_the_import_graph_has_no_circle():
    edges, state, circles = graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The walk itself finds what it must refuse (a test that cannot fail proves nothing)."""
    (tmp_path / "low.py").write_text("def f():\n    from .high import g\n")
    (tmp_path / "high.py").write_text("from .low import f\n")
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    found = graph()
    assert found["low"] == {"high"} and found["high"] == {"low"}
