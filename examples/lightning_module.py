"""frozenopt in Lightning: ``configure_optimizers`` returns a frozenopt optimizer.

The backbone starts frozen and a callback unfreezes it at an epoch, on the optimizer
Lightning already holds (no rebuild, unlike Lightning's BaseFinetuning, which adds
param groups). Run: python examples/lightning_module.py [--epochs N]
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frozenopt


class LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        opt = frozenopt.AdamW(self, lr=1e-2)  # names as in self.named_parameters()
        opt.freeze("backbone")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class UnfreezeAt(L.Callback):
    """Unfreeze targets at an epoch, on the optimizer Lightning holds."""

    def __init__(self, epoch: int, *targets: str) -> None:
        self.epoch, self.targets = epoch, targets

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            opt = trainer.optimizers[0]
            print(f"epoch {self.epoch}: unfreezing {opt.unfreeze(*self.targets)}")


class CheckFrozen(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = pl_module.backbone[0].weight.detach().clone()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        same = torch.equal(pl_module.backbone[0].weight, self.start)
        print(f"epoch {trainer.current_epoch}: backbone unchanged = {same}")
        assert same == (trainer.current_epoch < 1), "backbone must move only once unfrozen"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x @ torch.randn(16, 3)).argmax(1)
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[UnfreezeAt(1, "backbone"), CheckFrozen()])
    trainer.fit(LitNet(), data)
    print("done")


if __name__ == "__main__":
    main()
