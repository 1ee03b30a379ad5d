"""opt.clip_grad_norm_: torch.nn.utils.clip_grad_norm_ over exactly the params a step moves
(unfrozen, with a grad), and the recipes for Lightning and the Hugging Face Trainer."""

import copy
import math

import pytest
import torch
from matrix import BodyHead
from torch import nn

import frozenopt

BIG = 1e6  # frozen grads this large would dominate a norm over every param


def model_and_opt(mask_only):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    unused = nn.Linear(2, 2)  # in the optimizer, never gets a grad
    opt = frozenopt.AdamW([*model.named_parameters(), *unused.named_parameters(prefix="unused")],
                          mask_only=mask_only)
    opt.freeze("0")
    model(torch.randn(5, 4)).pow(2).sum().backward()
    for p in model[0].parameters():
        if not mask_only:  # default mode: frozen params get no grad from backward, but a user may set one
            p.grad = torch.randn_like(p)
        p.grad.mul_(BIG)
    return model, opt


def trainable_twins(model, opt):
    """Copies of the params (and grads) a step would move, for torch's own function."""
    twins = []
    for p in model.parameters():
        if p.grad is not None and not opt.is_frozen(p):
            twin = p.detach().clone().requires_grad_()
            twin.grad = p.grad.clone()
            twins.append((p, twin))
    return twins


@pytest.mark.parametrize("mask_only", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_equals_torch_on_the_unfrozen_params_with_grads(mask_only, norm_type, max_norm):
    model, opt = model_and_opt(mask_only)
    twins = trainable_twins(model, opt)
    assert len(twins) == 4  # [2] and [4]; not [0] (frozen) nor "unused" (no grad)
    frozen_grads = [p.grad.clone() for p in model[0].parameters()]
    total = opt.clip_grad_norm_(max_norm, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_([t for _, t in twins], max_norm, norm_type=norm_type)
    assert torch.equal(total, expected)
    for p, twin in twins:
        assert torch.equal(p.grad, twin.grad)
    for p, grad in zip(model[0].parameters(), frozen_grads):
        assert torch.equal(p.grad, grad)  # frozen grads are neither counted nor scaled
    if mask_only:  # why the method exists: torch's function over model.parameters() counts frozen grads
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf, norm_type=norm_type) > 1000 * total


def test_nonfinite_check_covers_only_the_unfrozen_params():
    model, opt = model_and_opt(mask_only=True)
    model[0].weight.grad[0, 0] = math.inf
    opt.clip_grad_norm_(1.0, error_if_nonfinite=True)  # the inf is in a frozen param
    model[2].weight.grad[0, 0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_clipped_run_equals_torch_optim_clipping_only_the_trainable_params():
    """Five mask_only steps with clipping equal torch.optim AdamW over the unfrozen params."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    opt = frozenopt.AdamW(model, lr=0.05, mask_only=True)
    opt.freeze("0")
    ref = torch.optim.AdamW(twin[2].parameters(), lr=0.05)
    for _step in range(5):
        x = torch.randn(6, 4)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (m(x).pow(2).sum() * 100).backward()
        assert model[0].weight.grad is not None  # mask_only: the frozen layer has its grads
        opt.clip_grad_norm_(0.1)
        torch.nn.utils.clip_grad_norm_(twin[2].parameters(), 0.1)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


class Scaled(BodyHead):
    """A small model whose first layer's grads are multiplied by BIG (and it is frozen)."""

    def __init__(self):
        super().__init__(4, 8, 1)
        for p in self.body.parameters():
            p.register_hook(lambda g: g * BIG)

    def forward(self, x, y=None):
        out = super().forward(x).squeeze(-1)
        return out if y is None else {"loss": nn.functional.mse_loss(out, y) * 100, "logits": out}


def unfrozen_norm(model):
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.head.parameters()]))


def test_lightning_recipe_clips_over_the_unfrozen_params():
    L = pytest.importorskip("lightning.pytorch")
    norms = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Scaled()

        def training_step(self, batch, _):
            return self.net(*batch)["loss"]

        def configure_optimizers(self):
            opt = frozenopt.AdamW(self, lr=1e-2, mask_only=True)
            opt.freeze("net.body")
            return opt

        # the recipe in docs/ecosystem.md
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if gradient_clip_val:
                optimizer.clip_grad_norm_(gradient_clip_val)
            norms.append((unfrozen_norm(self.net), self.net.body.weight.grad.abs().max().item()))

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, generator=g) * 10)
    module = Module()
    body = module.net.body.weight.detach().clone()
    trainer = L.Trainer(max_steps=3, gradient_clip_val=0.01, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert len(norms) == 3
    for head_norm, body_grad in norms:
        assert head_norm == pytest.approx(0.01, rel=1e-4)  # clipped to max_norm, not to max_norm / BIG
        assert body_grad > 1.0  # the frozen grads were left as they are
    assert torch.equal(module.net.body.weight, body)


def test_hugging_face_trainer_recipe_clips_over_the_unfrozen_params(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    norms = []

    # the recipe in docs/ecosystem.md
    class ClipUnfrozen(transformers.TrainerCallback):
        def __init__(self, opt, max_norm):
            self.opt, self.max_norm = opt, max_norm

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.opt.clip_grad_norm_(self.max_norm)
            norms.append((unfrozen_norm(model), model.body.weight.grad.abs().max().item()))

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, generator=g) * 10

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i]}

    model = Scaled()
    opt = frozenopt.AdamW(model, lr=1e-2, mask_only=True)
    opt.freeze("body")
    body = model.body.weight.detach().clone()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                          max_grad_norm=0, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, sched),
                                   callbacks=[ClipUnfrozen(opt, 0.01)])
    trainer.train()
    assert len(norms) == 3
    for head_norm, body_grad in norms:
        assert head_norm == pytest.approx(0.01, rel=1e-4)
        assert body_grad > 1.0
    assert torch.equal(model.body.weight, body)
