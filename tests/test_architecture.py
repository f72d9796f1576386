"""Architecture rules, checked on the source: no import cycle, shared code never names a method.

- The import graph of ``src/mixtune`` (every ``import`` / ``from ... import``, at module level
  or inside functions; ``if TYPE_CHECKING:`` blocks excepted) has no cycle.
- Shared modules (engine, data, eval, continual, suite, integrations, report, config) never
  compare a method's name (``x.name == "dynamics"``, ``mixer in (...)``), never look up a
  method's options or hooks by string (``getattr(mixer, "slopes")``, ``hasattr(loss, ...)``)
  and never touch a method's private state (``mx.o``, ``loss._x``). Methods declare what they
  need (``requires``, :mod:`mixtune.registry`) and the loop calls their hooks directly.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from mixtune.registry import LOSSES, MIXERS, PLANNERS

SRC = Path(__file__).resolve().parent.parent / "src" / "mixtune"
SHARED = ("engine", "data", "eval", "continual", "suite", "integrations", "report")
SHARED_FILES = ("config.py", "schema.py", "rawconfig.py", "simplex.py")
METHODISH = ("mixer", "mx", "loss", "opts", "options", "planner", "controller", "method")


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the mixtune modules it imports (a submodule when it names one, else the
    package; importing ``a.b.c`` also runs ``a.b``'s ``__init__``, counted as an edge)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for t in targets:
                # the packages a module import runs first (their __init__), then the module
                parts = t.split(".")
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in mods and dep != m and not m.startswith(dep + "."):
                        graph[m].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and sum(len(v) for v in graph.values()) > 100  # it saw the code
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_config_imports_no_method():
    graph = import_graph()
    methods = {
        m
        for m in graph
        if m.startswith(("mixtune.mixers.", "mixtune.losses.", "mixtune.planners."))
    }
    reach, todo = set(), ["mixtune.config"]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    assert not reach & methods, sorted(reach & methods)


# ---------------------------------------------------------------------------------------------
# Shared code does not know specific methods


def _method_names() -> set[str]:
    return set(MIXERS) | set(LOSSES) | set(PLANNERS)


def _option_names() -> set[str]:
    """Option fields of every method's Config (nested ones too)."""
    out, todo = set(), []
    for reg in (MIXERS, LOSSES):
        for name in reg:
            cls = getattr(reg[name], "Config", None)
            if cls is not None:
                todo.append(cls)
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            out.add(f.name)
            if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
                todo.append(f.type)
    return out


def _shared_files() -> list[Path]:
    files = [SRC / f for f in SHARED_FILES]
    for d in SHARED:
        files += sorted((SRC / d).rglob("*.py"))
    return files


def violations(source: str, names: set[str], options: set[str]) -> list[str]:
    """Where ``source`` compares a method's name, looks up a method's option or hook by string,
    or reaches into a method's private state."""
    out = []

    def strings(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(strings(e) for e in node.elts)) if node.elts else set()
        return set()

    def methodish(node) -> bool:
        text = ast.unparse(node).lower()
        return "name" in text or any(w in text for w in METHODISH)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for i, side in enumerate(sides):
                hit = strings(side) & names
                if hit and any(methodish(o) for j, o in enumerate(sides) if j != i):
                    out.append(f"line {node.lineno}: compares a method name {sorted(hit)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "getattr",
            "hasattr",
        ):
            if len(node.args) >= 2 and methodish(node.args[0]) and strings(node.args[1]):
                out.append(
                    f"line {node.lineno}: {node.func.id} of "
                    f"{sorted(strings(node.args[1]))} on a method"
                )
        elif isinstance(node, ast.Attribute):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if node.attr == "o" or (private and methodish(owner)):
                out.append(f"line {node.lineno}: reaches into a method's .{node.attr}")
    return out


def test_the_checker_catches_what_it_should():
    names, options = {"dynamics", "cadft"}, {"rewrite", "slopes"}
    bad = (
        "if cfg.mixer.name == 'dynamics': pass\n"
        "x = name in ('cadft', 'sft')\n"
        "y = getattr(opts, 'rewrite', None)\n"
        "z = trainer.mixer.o.decisions\n"
        "w = mixer._state\n"
        "v = hasattr(trainer.loss_fn, 'after_step')\n"
    )
    assert len(violations(bad, names, options)) == 6
    good = (
        "x = self._cache\nif cfg.train.fsdp: pass\nname = 'dynamics'\n"
        "if scheme == 'dynamics': pass\ninner = getattr(optimizer, 'optimizer', optimizer)\n"
        "os._exit(0)\n"
    )
    assert violations(good, names, options) == []


@pytest.mark.parametrize("path", _shared_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_shared_module_does_not_know_methods(path):
    found = violations(path.read_text(), _method_names(), _option_names())
    assert not found, f"{path.relative_to(SRC)}: " + "; ".join(found)
