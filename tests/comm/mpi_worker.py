"""Run under mpiexec by tests/comm/test_mpi.py: fastnet's algorithms over MPICommunicator.
Rank 0 prints one JSON line with every rank's results."""

import hashlib
import json

import torch

from fastnet.comm import AlgorithmAllReduce
from fastnet.comm.algorithms import hierarchical_all_reduce, ring_all_reduce
from fastnet.comm.communicators.mpi import MPICommunicator
from fastnet.comm.planning.hierarchy import Hierarchy

comm = MPICommunicator()
n, r = comm.size, comm.rank
results = {}
hier = {rpn: Hierarchy(comm, rpn) for rpn in sorted({1, 2, n}) if rpn <= n}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for length in (0, 1, 7, 97, 65537):
        expected = ((torch.arange(length) % 7 + 1) * (n * (n + 1) // 2)).to(dtype)
        cases = [("ring", 0)] + [(a, k) for k in hier for a in ("hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "pipelined")
                                 if a.startswith("leader") or n % k == 0]
        for alg, k in cases:
            x = ((torch.arange(length) % 7 + 1) * (r + 1)).to(dtype)
            try:
                if alg == "pipelined":  # hierarchical in segments of 1000 elements (odd tail)
                    hierarchical_all_reduce(hier[k].intra, hier[k].inter, x, segment_elems=1000)
                else:
                    ring_all_reduce(comm, x) if alg == "ring" else hier[k].all_reduce(x, alg)
                ok = bool(torch.equal(x, expected))
            except TypeError as exc:
                ok = str(exc)
            digest = hashlib.sha256(x.view(torch.uint8).numpy().tobytes()).hexdigest()
            results[f"{alg}/{k}/{dtype}/{length}"] = [ok, digest]
grads = [torch.full((5, 3), float(r + 1)), torch.full((4,), float(r + 1)).half()]
AlgorithmAllReduce(comm, "leader", 16, "fp16", ranks_per_node=2)(grads)
results["sync"] = [bool(torch.allclose(grads[0], torch.full((5, 3), (n + 1) / 2))) and
                   bool(torch.allclose(grads[1].float(), torch.full((4,), (n + 1) / 2), rtol=1e-3)), ""]
try:
    AlgorithmAllReduce(comm, "ring")([torch.ones(3 + (r == n - 1))])
    results["mismatch"] = ["no error", ""]
except ValueError as exc:
    results["mismatch"] = [str(exc), ""]
rpn = comm.ranks_per_node()  # collective: every rank calls it
hosts = Hierarchy(comm).topology  # nodes from the host names: must agree with MPI's shared-memory split
results["hosts"] = [hosts.local_size == rpn and hosts.num_nodes == 1, hosts.describe()]
everything = comm.comm.gather(results, root=0)
if r == 0:
    print("RESULTS " + json.dumps({"size": n, "rpn": rpn, "ranks": everything}))
