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


# _modules, _imports and _cycles: as in tests/test_imports.py (landed 2026-12-07); import them from there.


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
