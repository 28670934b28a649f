"""The package's import graph, read from the source (AST; nothing is imported).

Rules (see docs/architecture.md, "Who may import what"):

1. No import cycles between modules of ``raymanifold`` and ``serve``, counting
   (a) the imports a module runs when it is imported (module level, incl. class
   bodies and ``try``/``if`` blocks; ``if TYPE_CHECKING:`` blocks excluded), and
   (b) every import, also the deferred ones inside functions: a function-level
   import that closes a loop (``checkpoint`` -> ``tracking`` -> ``checkpoint``)
   is still a loop in the design, only hidden from the interpreter.
   A module's import of one of its own parent packages is not an edge: Python
   runs a package's ``__init__`` before any of its modules anyway, and the
   registry pattern (``data/__init__`` imports ``data/toy2d``, which registers
   itself with ``data``) would otherwise read as a loop.
2. ``ray`` only in ``raymanifold/distributed/`` (and ``serve/``, the Ray Serve
   application); ``mlflow`` only in ``raymanifold/tracking/``: every import counts,
   deferred ones too.
3. The core (the recipe protocol, config, checkpoints, the training loop, data
   sets, analysis, scoring and every family's recipe module in ``FAMILIES``),
   with everything it imports, even lazily, reaches no edge module (``cli``,
   ``commands``, ``runs``, ``distributed``, ``tracking``, ``serve``): a model
   loads, trains in-process and scores without Ray, MLflow or the CLI. Studies
   that orchestrate Ray runs live beside their family but outside this closure.
4. No module edits ``sys.path`` to reach another package (imports go through
   the installed packages).
5. No cycles between packages: collapsed to packages (the sub-packages of
   ``raymanifold``, its top-level modules, ``serve``), the import graph (every
   import, deferred ones too) has no loop, so no import runs back up the layers.
6. A family package (``FAMILY_PACKAGES``: the families and the cross-family
   ``ood`` benchmark) imports no edge module, not even lazily: its studies get
   ``train`` / ``load`` / Ray-backed steps as arguments from the command
   (:class:`raymanifold.commands.study.Study`).

Dynamic imports (``importlib.import_module(FAMILIES[name])``) are not seen; the
family registry is the one place that uses them.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raymanifold", "serve")
#: top-level third-party package -> the package folders (module-name prefixes) allowed to import it
RESTRICTED = {"ray": ("raymanifold.distributed", "serve"), "mlflow": ("raymanifold.tracking",)}
#: edge modules (prefixes): they may import Ray/MLflow-facing code; the core may not reach them
EDGES = ("raymanifold.cli", "raymanifold.commands", "raymanifold.runs", "raymanifold.distributed",
         "raymanifold.tracking", "serve")
#: the core (prefixes), plus the family modules listed in raymanifold/recipes.py FAMILIES
CORE = ("raymanifold.recipes", "raymanifold.schema", "raymanifold.config", "raymanifold.checkpoint",
        "raymanifold.training", "raymanifold.reports", "raymanifold.data", "raymanifold.analysis",
        "raymanifold.scoring", "raymanifold.blocks")


#: packages holding family code (rule 6): they import no edge module
FAMILY_PACKAGES = ("raymanifold.vae", "raymanifold.diffusion", "raymanifold.flows", "raymanifold.adversarial",
                   "raymanifold.recognition", "raymanifold.ssl", "raymanifold.ood")


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module (fully qualified; may be outside the walked packages)
    names: tuple       # ``from target import names`` (empty for ``import target``)
    line: int
    toplevel: bool     # runs when ``source`` is imported


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def walk_modules(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every ``*.py`` under the package folders."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path, is_pkg)
    return out


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool):
        self.module, self.is_pkg = module, is_pkg
        self.depth = 0
        self.found: list[Import] = []

    def _deferred(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _deferred

    def visit_If(self, node):
        t = node.test
        if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
                (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
            for child in node.orelse:    # the TYPE_CHECKING body never runs
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        for a in node.names:
            self.found.append(Import(self.module, a.name, (), node.lineno, self.depth == 0))

    def visit_ImportFrom(self, node):
        if node.level:
            pkg = self.module.split(".") if self.is_pkg else self.module.split(".")[:-1]
            base = pkg[:len(pkg) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module
        self.found.append(Import(self.module, target, tuple(a.name for a in node.names), node.lineno,
                                 self.depth == 0))


def imports_of(module: str, path: Path, is_pkg: bool) -> list[Import]:
    v = _Visitor(module, is_pkg)
    v.visit(ast.parse(path.read_text(), filename=str(path)))
    return v.found


def all_imports(root: Path, packages=PACKAGES) -> tuple[dict, list[Import]]:
    mods = walk_modules(root, packages)
    found = []
    for name, (path, is_pkg) in mods.items():
        found.extend(imports_of(name, path, is_pkg))
    return mods, found


def edges(mods: dict, found: list[Import], *, toplevel_only: bool) -> dict[str, dict[str, int]]:
    """Internal import graph: source -> {target module: first line}. ``from p import m`` with ``p.m``
    a module is an edge to ``p.m``; imports of the source's own parent packages are left out."""
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for imp in found:
        if toplevel_only and not imp.toplevel:
            continue
        targets = []
        for n in imp.names:
            sub = f"{imp.target}.{n}"
            targets.append(sub if sub in mods else imp.target)
        if not imp.names:
            targets.append(imp.target)
        for t in targets:
            if t not in mods or t == imp.source or _within(imp.source, t):
                continue
            graph[imp.source].setdefault(t, imp.line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed
    path ``[a, b, ..., a]`` found by a breadth-first search inside the component."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    cycles = []
    for comp in sorted(comps):
        members, start = set(comp), comp[0]
        prev, queue = {start: None}, [start]
        path = None
        while queue and path is None:       # shortest path start -> ... -> start inside the component
            nxt = []
            for v in queue:
                for w in sorted(graph[v]):
                    if w == start:
                        path = [w]
                        u = v
                        while u is not None:
                            path.append(u)
                            u = prev[u]
                        path.reverse()
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path:
                    break
            queue = nxt
        cycles.append([start] + path[1:] if path else comp)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]], mods: dict, root: Path = ROOT) -> str:
    """``a -> b (a's file:line of the import) -> ... -> a``."""
    steps = [cycle[0]]
    for a, b in zip(cycle, cycle[1:]):
        steps.append(f"-> {b} ({mods[a][0].relative_to(root)}:{graph[a][b]})")
    return " ".join(steps)


def restricted_violations(found: list[Import], restricted=RESTRICTED) -> list[str]:
    bad = []
    for imp in found:
        top = imp.target.split(".")[0]
        if top in restricted and not any(_within(imp.source, p) for p in restricted[top]):
            where = "deferred" if not imp.toplevel else "module level"
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({where}); "
                       f"{top} is allowed only in {', '.join(restricted[top])}")
    return bad


def registered_families(recipes_py: Path) -> dict[str, str]:
    """The ``FAMILIES = {...}`` literal of recipes.py (read from the source)."""
    for node in ast.parse(recipes_py.read_text()).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "FAMILIES" for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{recipes_py}: no FAMILIES = {{...}} literal")


def layer_violations(mods: dict, found: list[Import], core=CORE, edges_=EDGES) -> list[str]:
    """Edge modules reachable from the core through any import, each with the chain that reaches it."""
    graph = edges(mods, found, toplevel_only=False)
    roots = sorted(m for m in mods if any(_within(m, c) for c in core))
    prev = {r: None for r in roots}
    queue, bad = list(roots), []
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w in prev:
                continue
            prev[w] = v
            if any(_within(w, e) for e in edges_):
                chain, u = [w], v
                while u is not None:
                    chain.append(u)
                    u = prev[u]
                chain.reverse()
                bad.append(" -> ".join(f"{a} ({mods[a][0].name}:{graph[a][b]})" for a, b in zip(chain, chain[1:]))
                           + f" -> {w}")
            else:
                queue.append(w)
    return bad


def package_of(module: str) -> str:
    """``raymanifold.<sub>.x`` -> ``raymanifold.<sub>`` (a sub-package, or a top-level module); ``serve.x`` ->
    ``serve``."""
    parts = module.split(".")
    return parts[0] if len(parts) == 1 or parts[0] != "raymanifold" else ".".join(parts[:2])


def package_graph(mods: dict, found: list[Import]) -> tuple[dict, dict]:
    """(graph, where): package -> {package: 1} over every import between modules of different packages, and
    (package, package) -> the first ``module:line`` behind that edge."""
    g = edges(mods, found, toplevel_only=False)
    graph, where = {package_of(m): {} for m in mods}, {}
    for a, targets in g.items():
        for b, line in sorted(targets.items()):
            pa, pb = package_of(a), package_of(b)
            if pa != pb:
                graph[pa][pb] = 1
                where.setdefault((pa, pb), f"{a}:{line}")
    return graph, where


def package_cycles(mods: dict, found: list[Import]) -> list[str]:
    graph, where = package_graph(mods, found)
    return [" -> ".join([c[0]] + [f"{b} ({where[(a, b)]})" for a, b in zip(c, c[1:])]) for c in find_cycles(graph)]


def family_edge_imports(found: list[Import], families=FAMILY_PACKAGES, edges_=EDGES) -> list[str]:
    """Imports of an edge module by a module of a family package (every import, deferred ones too)."""
    return [f"{i.source}:{i.line} imports {i.target}" for i in found
            if any(_within(i.source, f) for f in families) and any(_within(i.target, e) for e in edges_)]


def sys_path_edits(mods: dict) -> list[str]:
    """``sys.path.insert/append/extend/...`` calls and ``sys.path = ...`` / ``sys.path[...] = ...`` assignments."""
    bad = []
    for name, (path, _) in sorted(mods.items()):
        for node in sorted(ast.walk(ast.parse(path.read_text(), filename=str(path))),
                           key=lambda n: getattr(n, "lineno", 0)):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    target = t.value if isinstance(t, ast.Subscript) else t
            if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                    and target.value.id == "sys"):
                bad.append(f"{name}:{node.lineno} edits sys.path")
    return bad


# ----------------------------------------------------------------------------- the checker, on a tiny package
def _write(root: Path, files: dict):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_cycles_and_forbidden_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",                          # a -> b -> c -> a at import time
        "pkg/b.py": "import pkg.c\n",
        "pkg/c.py": "from . import a\n",
        "pkg/d.py": "def f():\n    from pkg.e import g\n",          # d <-> e only through a deferred import
        "pkg/e.py": "from .d import f\n",
        "pkg/reg/__init__.py": "def load():\n    from pkg.reg import one\n",   # registry: parent <-> child
        "pkg/reg/one.py": "from pkg.reg import load\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "pkg/net/__init__.py": "",
        "pkg/net/use.py": "def run():\n    import ray.data\n    from mlflow import log_metric\n",
        "pkg/dist/__init__.py": "import ray\n",
        "pkg/core.py": "from pkg.dist import x\n",
        "pkg/hack.py": "import sys\nsys.path.insert(0, '..')\nsys.path += ['x']\nprint(sys.path)\n",
    })
    mods, found = all_imports(tmp_path, ("pkg",))
    assert "pkg.reg" in mods and "pkg.reg.one" in mods and mods["pkg.reg"][1]
    top = edges(mods, found, toplevel_only=True)
    every = edges(mods, found, toplevel_only=False)
    assert find_cycles(top) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert find_cycles(every) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]
    assert describe(find_cycles(every)[1], every, mods, tmp_path) == "pkg.d -> pkg.e (pkg/d.py:2) -> pkg.d (pkg/e.py:1)"
    assert "pkg.a" not in every["pkg.typed"]                         # TYPE_CHECKING imports never run
    bad = restricted_violations(found, {"ray": ("pkg.dist",), "mlflow": ("pkg.track",)})
    assert len(bad) == 2 and bad[0].startswith("pkg.net.use:2 imports ray.data (deferred)")
    assert "mlflow is allowed only in pkg.track" in bad[1]
    assert layer_violations(mods, found, ("pkg.core", "pkg.typed"), ("pkg.dist",)) == [
        "pkg.core (core.py:1) -> pkg.dist"]
    assert layer_violations(mods, found, ("pkg.d",), ("pkg.net",)) == []
    assert sys_path_edits(mods) == ["pkg.hack:2 edits sys.path", "pkg.hack:3 edits sys.path"]


def test_package_checker_finds_loops_between_packages(tmp_path):
    _write(tmp_path, {
        "raymanifold/__init__.py": "",
        "raymanifold/a/__init__.py": "",
        "raymanifold/a/x.py": "def f():\n    from raymanifold.b import y\n",   # a -> b (deferred) ...
        "raymanifold/b/__init__.py": "",
        "raymanifold/b/y.py": "from raymanifold.a.z import g\n",              # ... b -> a: a loop of packages
        "raymanifold/a/z.py": "g = 1\n",                                        # (no loop of modules)
        "raymanifold/c/__init__.py": "from raymanifold.c import w\n",           # a parent-package import: no edge
        "raymanifold/c/w.py": "import raymanifold.c\nimport raymanifold.runs\n",
        "raymanifold/runs.py": "",
    })
    mods, found = all_imports(tmp_path, ("raymanifold",))
    assert find_cycles(edges(mods, found, toplevel_only=False)) == []
    assert package_cycles(mods, found) == [
        "raymanifold.a -> raymanifold.b (raymanifold.a.x:2) -> raymanifold.a (raymanifold.b.y:1)"]
    assert package_of("raymanifold.runs") == "raymanifold.runs" and package_of("serve.app") == "serve"
    assert family_edge_imports(found, ("raymanifold.c",)) == ["raymanifold.c.w:2 imports raymanifold.runs"]


def test_relative_imports_resolve():
    assert imports_of("p.q.m", Path(__file__), False)  # this file parses; names below are synthetic
    v = _Visitor("p.q.m", False)
    v.visit(ast.parse("from . import a\nfrom ..r import b\nfrom .s.t import c\n"))
    assert [(i.target, i.names) for i in v.found] == [("p.q", ("a",)), ("p.r", ("b",)), ("p.q.s.t", ("c",))]
    v = _Visitor("p.q", True)                       # in a package's __init__, "." is the package itself
    v.visit(ast.parse("from . import a\nfrom .. import b\n"))
    assert [i.target for i in v.found] == ["p.q", "p"]


# ----------------------------------------------------------------------------- the rules, on this repository
@pytest.fixture(scope="module")
def repo():
    mods, found = all_imports(ROOT)
    assert "raymanifold.recipes" in mods and "serve.app" in mods   # the walk sees the package
    return mods, found


@pytest.mark.parametrize("toplevel_only", [True, False], ids=["import-time", "incl-deferred"])
def test_no_import_cycles(repo, toplevel_only):
    mods, found = repo
    graph = edges(mods, found, toplevel_only=toplevel_only)
    cycles = [describe(c, graph, mods) for c in find_cycles(graph)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_ray_and_mlflow_stay_at_the_edges(repo):
    _, found = repo
    bad = restricted_violations(found)
    assert not bad, "\n  ".join(["ray/mlflow imported outside their packages:"] + bad)


def test_core_reaches_no_edge_module(repo):
    mods, found = repo
    fams = registered_families(ROOT / "raymanifold" / "recipes.py")
    assert set(fams) >= {"diffusion", "gridvae", "flow", "glow"} and all(m in mods for m in fams.values())
    bad = layer_violations(mods, found, CORE + tuple(fams.values()))
    assert not bad, "\n  ".join(["the core reaches edge modules:"] + bad)


def test_no_sys_path_edits(repo):
    mods, _ = repo
    bad = sys_path_edits(mods)
    assert not bad, "\n  ".join(["modules editing sys.path:"] + bad)


def test_no_cycles_between_packages(repo):
    mods, found = repo
    bad = package_cycles(mods, found)
    assert not bad, "\n  ".join(["imports that run back up (package cycles):"] + bad)


def test_family_packages_import_no_edge_module(repo):
    _, found = repo
    bad = family_edge_imports(found)
    assert not bad, "\n  ".join(["family code imports an edge module (give it a callable instead):"] + bad)
