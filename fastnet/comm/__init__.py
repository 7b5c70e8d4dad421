"""fastnet.comm: gradient synchronisation for data-parallel training.

Today the trainer uses :class:`NativeAllReduce` (one flat all-reduce per dtype through
torch.distributed). The custom algorithms (ring, hierarchical, hybrid), tensor fusion and the
CuPy-NCCL / MPI communicators plug in behind the same ``GradientSync`` seam.
"""

from fastnet.comm.native import GradientSync, NativeAllReduce

__all__ = ["GradientSync", "NativeAllReduce"]
