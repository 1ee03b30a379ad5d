"""Fine-tune a small "pretrained" net with frozenopt: a plain PyTorch loop.

Freeze the backbone (keeping its BatchNorm trainable, fastai's train_bn), give each layer
group its own learning rate (lr=slice(a, b)), unfreeze gradually, all on one optimizer
that is never rebuilt. Run: python examples/plain_loop.py [--steps N]
"""

import argparse

import torch
from torch import nn

import frozenopt
from frozenopt import FineTuner, GradualUnfreeze, layer_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    model = Net()
    groups = layer_groups(model, ["backbone.0", "backbone.1", "backbone.3", "head"], lr=slice(1e-4, 1e-2))
    opt = frozenopt.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=args.steps)
    tuner = FineTuner(model, opt, keep_norm=True)
    tuner.freeze()  # all groups but the head; backbone.1 (BatchNorm) stays trainable
    third = max(1, args.steps // 3)
    unfreezer = GradualUnfreeze(opt, {third: "backbone.3", 2 * third: "backbone.0"})
    first = model.backbone[0].weight.detach().clone()

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=g)
    for step in range(args.steps):
        if unfreezer.step():
            print(f"step {step}: frozen now {opt.frozen}")
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.cross_entropy(model(x), (x @ w).argmax(1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step == 2 * third - 1:
            assert torch.equal(model.backbone[0].weight, first), "frozen layer moved"
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    assert not torch.equal(model.backbone[0].weight, first)
    print("done: frozen layers stayed put while frozen, then trained")


if __name__ == "__main__":
    main()
