"""The packages' import graph, read from the source with ``ast``: no cycle, function-local imports included.

A cycle (model -> masking -> model, tpp.encoding <-> tpp.examples) means a reader cannot take one module in
without the other, and a call back from a lower layer into a higher one. Edges: ``import a.b`` and
``from a.b import c`` at any depth of a module (module level, functions, ``try``), relative imports resolved;
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its __init__).
Importing a submodule is not counted as importing its parent package's __init__ (Python runs it first, but
that is loading order, not a dependency a reader follows). Imports under ``if TYPE_CHECKING:`` are not run
and are left out.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minigpt2", "tpp", "finetune", "circuitlab")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING"):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of ``graph``, or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "minigpt2.masking" in graph["minigpt2.model"]  # module level, relative
    assert "minigpt2.processing" in graph["minigpt2.lens"]  # inside a method, relative
    assert "minigpt2.tokenizer" in graph["tpp.encoding"]  # inside a function, absolute
    assert "minigpt2.patching" in graph["minigpt2"]  # `from . import patching` in a package's __init__
    assert "minigpt2.model" not in graph["minigpt2.masking"]  # under `if TYPE_CHECKING:` only


def test_type_checking_imports_are_left_out_and_others_kept(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                    "def f():\n    from ..b import c\n    import d.e\n")
    known = {"p.q.a", "p.b", "p.b.c", "d.e", "p.q.m"}
    assert imports_of("p.q.m", path, known) == {"p.b.c", "d.e"}


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_parses(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ----------------------------------------------------------------------------- who runs the model's blocks
# Only the model core (minigpt2.model, and minigpt2.engine, which propagates variants through it) runs blocks or
# calls into their parts. The modules listed below still do, each with an engine of its own (issue #27, "One
# engine core"): the list may only shrink; a module that starts running blocks fails the test below.
CORE = {"minigpt2.model", "minigpt2.engine"}
STILL_RUN_BLOCKS: set[str] = set()


def _is_blocks_item(node: ast.AST) -> bool:
    """``<anything>.blocks[...]``."""
    return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "blocks"


def _root(node: ast.AST) -> ast.AST:
    """The object an attribute chain starts from: ``a.b[1].c`` -> ``a.b[1]`` (a subscript ends the walk)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _bound_to_blocks(scope: ast.AST) -> set[str]:
    """The names that ``scope`` binds to ``<anything>.blocks[...]`` (``blk = m.blocks[l]``, ``a, blk = x, m.blocks[l]``)."""
    bound = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                bound |= {t.id for t, v in pairs if isinstance(t, ast.Name) and _is_blocks_item(v)}
    return bound


def runs_blocks(tree: ast.AST) -> list[int]:
    """Line numbers of calls of a block or of a block's parts: ``m.blocks[l](x)``, ``m.blocks[l].attn.project(x)``,
    or the same through a name the function binds to ``m.blocks[l]`` (``blk = m.blocks[l]; blk.finish(...)``).
    Reading weights (``m.blocks[l].attn.W_O``) is TransformerLens's API and is not counted."""
    lines = set()
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for scope in scopes:
        bound = _bound_to_blocks(scope) if scope is not tree else set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Call):
                root = _root(node.func)
                if _is_blocks_item(root) or (isinstance(root, ast.Name) and root.id in bound):
                    lines.add(node.lineno)
    return sorted(lines)


def test_runs_blocks_finds_calls_and_not_weight_reads():
    src = ("def f(model, x):\n    blk = model.blocks[l]\n    y = blk.attn.project(x)\n    z = model.blocks[0](x)\n"
           "    w = model.blocks[1].attn.W_O\n    u = torch.einsum('ij,jk', x, model.blocks[2].mlp.W_out)\n"
           "    a, b = 1, m.blocks[3]\n    b.finish(x)\n"
           "def g(blk):\n    blk.register_forward_pre_hook(print)\n")  # g's blk is its own parameter
    assert runs_blocks(ast.parse(src)) == [3, 4, 8]


def test_only_the_model_core_runs_blocks():
    mods = modules()
    running = {name for name, path in mods.items() if runs_blocks(ast.parse(path.read_text(encoding="utf-8")))}
    newcomers = running - CORE - STILL_RUN_BLOCKS
    assert not newcomers, (f"{sorted(newcomers)} run the model's blocks: put the propagation in minigpt2.engine "
                           "(one engine core) and call that")
    assert STILL_RUN_BLOCKS <= running, f"{sorted(STILL_RUN_BLOCKS - running)} no longer run blocks: drop them from " \
                                        "STILL_RUN_BLOCKS"


def test_the_task_package_loads_no_model_code():
    # STYLE: tpp never imports the model; a user of the dataset alone does not pay for minigpt2's import
    code = ("import sys, tpp, tpp.metrics, tpp.encoding, tpp.examples\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('minigpt2', 'circuitlab', 'finetune')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
