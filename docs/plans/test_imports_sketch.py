"""fastnet's import graph: no cycle anywhere, and fastnet.comm's layers import only downward (issue 38).

Static (ast), so it sees imports inside functions too (they close cycles just the same, only later);
``if TYPE_CHECKING:`` blocks are skipped. Implicit parent-package imports are not edges (every
``fastnet.comm.x`` would otherwise depend on ``fastnet/comm/__init__.py``)."""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(os.environ.get("FASTNET_ROOT", Path(__file__).resolve().parents[1]))
PKG = ROOT / "fastnet"

# fastnet.comm's layers, lowest first: a module may import its own layer or lower ones only.
LAYERS = [
    ("fastnet.comm.trace", "fastnet.comm.scratch"),   # 0 support (stdlib/torch only)
    ("fastnet.comm.communicators",),                  # 1 the Communicator protocol, its backends, the factory
    ("fastnet.comm.algorithms",),                     # 2 ring / hierarchical / leader schedules
    ("fastnet.comm.planning",),                       # 3 topology, cost model, autotune, buckets, simulator
    ("fastnet.comm.gradients",),                      # 4 reducer, consistency, synchronizer, DDP hook
    ("fastnet.comm.backend",),                        # 5 the "fastnet" torch.distributed backend
    ("fastnet.comm.bench",),                          # 6 tools
]
# old import paths kept one release (PEP 562 shims); nothing in fastnet may import them
SHIMS = {f"fastnet.comm.{m}" for m in ("communicator", "mpi", "nccl", "topology", "cost_model", "autotune",
                                       "buckets", "sync", "native", "synchronizer", "ddp_hook", "simulate")}
FACADES = {"fastnet.comm"}  # the package __init__: public re-exports, above every layer


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(mods: dict[str, Path]):
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
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
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


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_no_import_cycle():
    mods = _modules()
    graph, where = defaultdict(set), defaultdict(list)
    for a, b, loc, lazy in _imports(mods):
        graph[a].add(b)
        where[a, b].append(loc + (" (in a function)" if lazy else ""))
    where = {k: sorted(set(v)) for k, v in where.items()}
    cycles = _cycles(dict(graph))
    report = [" <-> ".join(c) + "\n" + "\n".join(f"    {a} -> {b}: {', '.join(where[a, b])}"
                                                  for a in c for b in sorted(graph[a]) if b in c)
              for c in cycles]
    assert not cycles, "import cycles in fastnet:\n" + "\n".join(report)


def test_comm_layers_import_only_downward():
    bad = []
    for a, b, loc, _ in _imports(_modules()):
        la, lb = _layer(a), _layer(b)
        if la is not None and lb is not None and lb > la:
            bad.append(f"{loc}: {a} (layer {la}) imports {b} (layer {lb})")
        if la is not None and b == "fastnet.comm":
            bad.append(f"{loc}: {a} imports the fastnet.comm facade; import the defining module")
        if b in SHIMS and a not in SHIMS and a != "fastnet.comm":
            bad.append(f"{loc}: {a} imports the deprecated path {b}")
    assert not bad, "upward or deprecated imports in fastnet.comm:\n" + "\n".join(sorted(set(bad)))


def test_every_comm_module_has_a_layer():
    loose = sorted(m for m in _modules() if m.startswith("fastnet.comm.")
                   and _layer(m) is None and m not in SHIMS | FACADES)
    assert not loose, f"fastnet.comm modules outside every layer (add them to LAYERS): {loose}"
