"""The README's Accelerate recipe (run by tests/test_integrations.py under torchrun, 2 CPU ranks): the
process group is created first, ``init_process_group(BACKEND)``, and ``Accelerator()`` adopts it.
(``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="fastnet")])`` is refused on CPU:
Accelerate replaces any CPU backend but mpi by gloo; ``kwargs`` mode shows that refusal.)

    torchrun --standalone --nproc_per_node=2 tests/integrations/accelerate_mlp.py fastnet [kwargs]
"""

import hashlib
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

import fastnet.comm.backend  # noqa: F401 - registers "fastnet" (torch >= 2.14 finds it without this import)

if __name__ == "__main__":
    backend = sys.argv[1]
    if sys.argv[2:] == ["kwargs"]:
        acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])
    else:
        dist.init_process_group(backend)  # the recipe: the group first
        acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, opt, loader = acc.prepare(model, opt, loader)
    for _ in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            acc.backward(torch.nn.functional.cross_entropy(model(xb), yb))
            opt.step()
    if acc.is_main_process:
        params = acc.unwrap_model(model).parameters()
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
        routed = dict(getattr(dist.group.WORLD, "routed", {}))
        print(f"RESULT backend={dist.get_backend()} params={digest} fastnet_all_reduces={routed.get('fastnet:all_reduce', 0)}")
    acc.wait_for_everyone()
    dist.destroy_process_group()  # before exit: gloo's threads met at interpreter shutdown abort it
