"""fastnet's import graph: no cycle anywhere, and fastnet.comm's layers import only downward (issue 38).

Static (ast), so it sees imports inside functions too (they close a cycle just the same, only later);
``if TYPE_CHECKING:`` blocks are skipped. Implicit parent-package imports are not edges (every
``fastnet.comm.x`` would otherwise depend on ``fastnet/comm/__init__.py``).

The layers of fastnet.comm, bottom up (a module may import its own layer and those below):
0 support (trace, scratch, the deprecated-path forwarder) → 1 communicators → 2 algorithms →
3 planning → 4 gradients → 5 backend → 6 tools (bench). The old module paths (``fastnet.comm.sync``,
...) are deprecation shims that import nothing at import time; no fastnet module may import them
(the facade ``fastnet.comm`` imports ``ddp_hook``'s shim on purpose: see its comment)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastnet"

LAYERS = [
    ("fastnet.comm.trace", "fastnet.comm.scratch", "fastnet.comm._deprecated_paths"),
    ("fastnet.comm.communicators",),
    ("fastnet.comm.algorithms",),
    ("fastnet.comm.planning",),
    ("fastnet.comm.gradients",),
    ("fastnet.comm.backend",),
    ("fastnet.comm.bench",),
]
SHIMS = {f"fastnet.comm.{m}" for m in ("communicator", "mpi", "nccl", "topology", "cost_model", "autotune", "buckets",
                                       "simulate", "sync", "native", "synchronizer", "ddp_hook")}
FACADE = "fastnet.comm"


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(mods: dict[str, Path], root: Path):
    """Yield (importer, imported, 'file:line', lazy) for every fastnet import."""
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for s in node.body for n in ast.walk(s))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    yield name, t, where, id(node) in lazy


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _graph(pkg: Path = PKG) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    graph, where = defaultdict(set), defaultdict(list)
    for a, b, loc, lazy in _imports(_modules(pkg), pkg.parent):
        graph[a].add(b)
        where[a, b].append(loc + (" (in a function)" if lazy else ""))
    return dict(graph), {k: sorted(set(v)) for k, v in where.items()}


def _report(cycles, graph, where) -> str:
    return "\n".join(" <-> ".join(c) + "\n" + "\n".join(f"    {a} -> {b}: {', '.join(where[a, b])}"
                                                        for a in c for b in sorted(graph[a]) if b in c)
                     for c in cycles)


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def test_no_import_cycle():
    graph, where = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in fastnet (import the defining module one layer down):\n" + \
        _report(cycles, graph, where)


def test_the_walk_finds_a_cycle_closed_inside_a_function(tmp_path):
    """The walk itself works: a cycle closed by a lazy import, through a relative import, is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph, where = _graph(pkg)
    assert _cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert where["pkg.sub.b", "pkg.a"] == ["pkg/sub/b.py:2 (in a function)"]


def test_comm_layers_import_only_downward():
    graph, where = _graph()
    wrong = []
    for a, targets in graph.items():
        for b in targets:
            la, lb = _layer(a), _layer(b)
            if la is not None and lb is not None and lb > la:
                wrong.append(f"{a} (layer {la}) imports {b} (layer {lb}): {', '.join(where[a, b])}")
            if la is not None and b == FACADE:
                wrong.append(f"{a} imports the facade fastnet.comm (import the defining module): {', '.join(where[a, b])}")
            if b in SHIMS and a != FACADE:
                wrong.append(f"{a} imports the deprecated path {b}: {', '.join(where[a, b])}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_comm_module_has_a_layer():
    """A new file in fastnet/comm cannot escape the rule: it sits in a layer, or is a shim or the facade."""
    loose = [m for m in _modules() if m.startswith("fastnet.comm") and _layer(m) is None
             and m not in SHIMS and m != FACADE]
    assert not loose, f"fastnet.comm modules outside every layer: {loose}"


def test_shims_import_nothing_but_the_forwarder():
    """A deprecated path costs nothing at import and cannot close a cycle: it imports only the forwarder."""
    graph, _ = _graph()
    for shim in SHIMS:
        assert graph.get(shim, set()) <= {"fastnet.comm._deprecated_paths", "fastnet.comm.planning.simulate"}, shim


def test_the_wheel_lists_every_package():
    """pyproject's explicit package list names every fastnet package (a missing one would leave its
    files out of a built wheel while the editable install still finds them)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
