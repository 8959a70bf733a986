"""The package's layers: no import cycles, every module importable alone, output only in itda/cli/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import itda

ROOT = Path(itda.__file__).parent
CLI_ONLY = ("itda.cli", "itda.__main__")  # the command line: the one place that prints or imports typer


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.AST, module: str) -> list[str]:
    """The itda modules an import statement names (a `from pkg import name` names pkg.name when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "itda"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the module's package
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        base = ".".join(
            package.split(".")[: len(package.split(".")) - node.level + 1] + ([node.module] if node.module else [])
        )
    else:
        base = node.module or ""
    if base.split(".")[0] != "itda":
        return []
    named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return named if len(named) == len(node.names) else named + [base]


def import_graph() -> dict[str, set[str]]:
    """module -> the itda modules it imports (module-level and function-level imports alike)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {t for node in ast.walk(tree) for t in _imported(node, name) if t in MODULES and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle a -> ... -> a inside a strongly connected component (breadth-first from its first module)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a strongly connected component")


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among itda's modules:\n" + "\n".join(" -> ".join(c) for c in found)


def test_each_module_imports_alone():
    script = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {sorted(MODULES)!r}:
    if name == "itda.__main__":
        continue
    for loaded in [m for m in sys.modules if m == "itda" or m.startswith("itda.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps(failed))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())


def _output_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each typer/click import, print() call and typer.echo/click.echo call."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in ("typer", "click")
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("typer", "click"):
            found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append((node.lineno, "print()"))
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("echo", "secho")
        ):
            found.append((node.lineno, f"{ast.unparse(node.func)}()"))
    return found


def test_only_the_cli_prints_or_imports_typer():
    offending = [
        f"{MODULES[name].relative_to(ROOT.parent)}:{line}: {what}"
        for name in MODULES
        if not name.startswith(CLI_ONLY)
        for line, what in _output_calls(ast.parse(MODULES[name].read_text()))
    ]
    assert not offending, "output or typer outside itda/cli/:\n" + "\n".join(offending)


def test_evaluation_takes_coders_by_protocol():
    import torch

    from itda.dictionary import Dictionary, DictionaryMeta, empty_refs
    from itda.errors import ItdaInputError
    from itda.evaluation.coder import DictionaryCoder, ModelCoder, as_coder
    from itda.sae import LoadedSae, SaeConfig, SaeMeta, TopKSAE
    from itda.sae.coder import SaeCoder

    atoms = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    d = Dictionary(atoms, empty_refs(6), DictionaryMeta(d=8, k=2, hookpoint="resid_post.1"))
    loaded = LoadedSae(TopKSAE(SaeConfig(8, 16, 2)), SaeMeta(hookpoint="resid_post.1", include_special=True))
    x = torch.randn(5, 8)
    for obj, kind, what in ((d, DictionaryCoder, "dictionary"), (loaded, SaeCoder, "SAE")):
        coder = as_coder(obj, 2)
        assert isinstance(coder, kind) and isinstance(coder, ModelCoder) and coder.what == what and coder.d == 8
        ev = coder.evaluator()
        ev.update(x)
        assert ev.report().tokens == 5 and coder.reconstruct(x, 2).shape == x.shape
    assert as_coder(loaded).include_special and as_coder(as_coder(d)) is not None
    with pytest.raises(ItdaInputError, match="cannot evaluate"):
        as_coder(object())
