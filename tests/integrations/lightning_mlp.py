"""The README's Lightning recipe (run by tests/test_integrations.py under torchrun, 2 CPU ranks):
an unmodified LightningModule trained with ``DDPStrategy(process_group_backend=BACKEND)``.

    torchrun --standalone --nproc_per_node=2 tests/integrations/lightning_mlp.py fastnet
"""

import hashlib
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

import fastnet.comm.backend  # noqa: F401 - registers "fastnet" (torch >= 2.14 finds it without this import)


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


if __name__ == "__main__":
    backend = sys.argv[1]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = MLP()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend=backend),
                        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        routed = dict(getattr(dist.group.WORLD, "routed", {}))
        print(f"RESULT backend={dist.get_backend()} params={digest} fastnet_all_reduces={routed.get('fastnet:all_reduce', 0)}")
    if dist.is_initialized():
        dist.destroy_process_group()  # before exit: gloo's threads met at interpreter shutdown abort it
