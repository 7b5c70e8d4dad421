"""Layer 2 — all-reduce algorithms built only from :class:`~fastnet.comm.communicators.base.Communicator`
primitives (grouped point-to-point ``exchange``, and collectives), so they run on every backend.

All take a 1-D contiguous tensor ``x`` (any length, 0 included; any dtype the backend can send)
and reduce it in place with SUM over the communicator's ranks. For an average, divide by the
world size first (no FP16 overflow in the sum). Results are bitwise identical on every rank:
each element's final sum is computed on one rank and then copied to the others.

* :mod:`~fastnet.comm.algorithms.ring` — :func:`ring_all_reduce` (Patarasuk & Yuan 2009 / Baidu
  ring: reduce-scatter then all-gather, 2(n−1) steps, each rank sending 2(n−1)/n of the data).
* :mod:`~fastnet.comm.algorithms.hierarchical` — :func:`hierarchical_all_reduce` (intra-node ring
  reduce-scatter → inter-node ring all-reduce → intra-node ring all-gather, pipelined in segments
  so the phases of consecutive segments overlap where the communicators may run at the same time:
  NCCL's may not, :func:`~fastnet.comm.communicators.base.serial`) and
  :func:`collective_hierarchical_all_reduce` (the same phases as one backend collective each, as
  Horovod's hierarchical all-reduce and Jia et al. 2018 run on NCCL).
* :mod:`~fastnet.comm.algorithms.leader` — :func:`leader_all_reduce`, Jia et al. 2018 §4.2:
  reduce to a node leader → all-reduce among leaders → broadcast; 4(k−1) + 2(N/k − 1) steps.
* :mod:`~fastnet.comm.algorithms.steps` — message schedules and their drivers
  (:func:`run_steps`, :func:`run_pipelined`).

Registry names (:data:`fastnet.comm.gradients.reducer.ALGORITHMS`): ``hierarchical`` and ``leader``
are the collective-composed variants, ``hierarchical_p2p`` and ``leader_p2p`` the ring schedules
(``ring`` is always fastnet's point-to-point ring). The ring reduce-scatter / all-gather with
MPI semantics live one layer down, in :mod:`fastnet.comm.communicators.p2p`, and are re-exported
here.
"""

from fastnet.comm.algorithms.hierarchical import (collective_hierarchical_all_reduce, hierarchical_all_reduce,
                                                  hierarchical_steps)
from fastnet.comm.algorithms.leader import leader_all_reduce
from fastnet.comm.algorithms.ring import (ring_all_gather, ring_all_gather_steps, ring_all_reduce, ring_reduce_scatter,
                                          ring_reduce_scatter_steps, split_sizes)
from fastnet.comm.algorithms.steps import Steps, run_pipelined, run_steps
from fastnet.comm.communicators.p2p import RingStep, post, ring_all_gather_into, ring_reduce_scatter_into

__all__ = ["RingStep", "Steps", "collective_hierarchical_all_reduce", "hierarchical_all_reduce", "hierarchical_steps",
           "leader_all_reduce", "post", "ring_all_gather", "ring_all_gather_into", "ring_all_gather_steps",
           "ring_all_reduce", "ring_reduce_scatter", "ring_reduce_scatter_into", "ring_reduce_scatter_steps",
           "run_pipelined", "run_steps", "split_sizes"]
