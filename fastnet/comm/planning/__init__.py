"""Layer 3 — planning: what to run where, decided before (or while) the gradients move.

* :mod:`~fastnet.comm.planning.topology` — :class:`Topology`: which ranks share a node.
* :mod:`~fastnet.comm.planning.hierarchy` — :class:`Hierarchy`: the intra/inter/leader
  sub-communicators and the pipeline segment size; runs the hierarchical and leader algorithms.
* :mod:`~fastnet.comm.planning.cost_model` — the α-β cost model (Thakur, Rabenseifner & Gropp
  2005), its calibration and the hybrid choice per message size.
* :mod:`~fastnet.comm.planning.autotune` — :class:`OnlineChooser`: the hybrid choice from measured times.
* :mod:`~fastnet.comm.planning.buckets` — :func:`plan_buckets`: buckets from measured ready times.
* :mod:`~fastnet.comm.planning.simulate` — an iteration's compute/communication timeline from the
  cost model (``python -m fastnet.comm.simulate``).

Imports communicators and algorithms below it, never the gradient paths above.
"""

from fastnet.comm.planning.autotune import OnlineChooser
from fastnet.comm.planning.buckets import plan_buckets
from fastnet.comm.planning.cost_model import CostModel, Link, calibrate
from fastnet.comm.planning.hierarchy import Hierarchy
from fastnet.comm.planning.simulate import simulate_plan
from fastnet.comm.planning.topology import Topology

__all__ = ["CostModel", "Hierarchy", "Link", "OnlineChooser", "Topology", "calibrate", "plan_buckets", "simulate_plan"]
