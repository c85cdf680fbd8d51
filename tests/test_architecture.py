"""The layers of the package (docs/architecture.md) hold: no module imports from a layer above its own,
and the module-level imports have no cycle. Every import counts, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and the ones below. The first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("unlearn.errors", "unlearn.io", "unlearn.fmt", "unlearn.precision", "unlearn.gate",
                    "unlearn.data.names", "unlearn.config")),
    ("data and models", ("unlearn.data", "unlearn.models")),
    ("training and evaluation", ("unlearn.methods", "unlearn.cache", "unlearn.train", "unlearn.eval")),
    ("benchmarks, tracking, requests", ("unlearn.benchmark", "unlearn.tracking",
                                        "unlearn.requests.ledger", "unlearn.requests.inbox",
                                        "unlearn.requests.forget_set", "unlearn.requests.audit", "unlearn.requests")),
    ("pipeline", ("unlearn.stages", "unlearn.requests.cycle", "unlearn.study")),
    ("command line", ("unlearn.cli", "unlearn.cli_common", "unlearn.requests.cli", "unlearn.study.runner",
                      "unlearn.study.cli")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "unlearn").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _layer(mod: str) -> int:
    if mod == "unlearn":
        return -1  # the package root holds only __version__
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > depth:
                best, depth = i, len(pre)
    assert best is not None, f"module {mod} is in no layer: add it to LAYERS and to docs/architecture.md"
    return best


def _imports(mod: str, path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            if not target.startswith("unlearn"):
                continue
            for alias in n.names:  # `from unlearn import stages` imports the module unlearn.stages
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.startswith("unlearn")}
    return {m for m in found if m in MODULES and m != mod}


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_no_import_from_a_higher_layer():
    bad = []
    for mod, path in MODULES.items():
        for dep in _imports(mod, path):
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not bad, "imports up the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_at_module_level():
    graph = {mod: _imports(mod, path, top_level_only=True) for mod, path in MODULES.items()}
    # a package's __init__ importing its own submodules is not a cycle with them importing a sibling
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1 and not (m.startswith(d + ".") or d.startswith(m + ".")):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_layer_test_bites():
    """A deliberately upward import is reported (guards the test against matching nothing)."""
    assert _layer("unlearn.stages") > _layer("unlearn.cache")
    assert _layer("unlearn.requests.cycle") > _layer("unlearn.requests.ledger")
    assert _layer("unlearn.cli") > _layer("unlearn.stages")
