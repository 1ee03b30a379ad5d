"""opt.summary(): per-module trainable and frozen counts, shares and optimizer-state bytes."""

import pytest
import torch
from torch import nn

import frozenopt


def encoder():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "embeddings": nn.Embedding(100, 16),                                              # 1,600
        "encoder": nn.ModuleDict({"layer": nn.ModuleList(nn.Linear(16, 16) for _ in range(3))}),  # 3 x 272
        "head": nn.Linear(16, 2),                                                         # 34
    })


def train_step(model, opt):
    x = model["embeddings"](torch.tensor([1, 2, 3]))
    for layer in model["encoder"]["layer"]:
        x = layer(x)
    model["head"](x).sum().backward()
    opt.step()


def state_bytes(opt, params):
    return sum(t.numel() * t.element_size() for p in params for t in opt.state.get(p, {}).values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("mask_only", [False, True])
def test_rows_per_top_level_module(mask_only):
    model = encoder()
    opt = frozenopt.AdamW(model, lr=1e-3, mask_only=mask_only)
    opt.freeze("embeddings", "encoder.layer.0")
    train_step(model, opt)
    summary = opt.summary()
    rows = {r.name: r for r in summary.rows}
    assert list(rows) == ["embeddings", "encoder", "head"]
    assert (rows["embeddings"].trainable, rows["embeddings"].frozen) == (0, 1600)
    assert (rows["encoder"].trainable, rows["encoder"].frozen) == (544, 272)
    assert (rows["head"].trainable, rows["head"].frozen) == (34, 0)
    assert (summary.total.trainable, summary.total.frozen) == (578, 1872)
    assert summary.total.total == sum(p.numel() for p in model.parameters())
    assert rows["encoder"].trainable_percent == pytest.approx(100 * 544 / 816)
    # AdamW state of the trained params: exp_avg and exp_avg_sq (float32) and a float32 step each
    assert rows["embeddings"].state_bytes == 0
    assert rows["encoder"].state_bytes == state_bytes(opt, model["encoder"].parameters()) == 2 * 544 * 4 + 4 * 4
    assert summary.total.state_bytes == state_bytes(opt, model.parameters())


def test_the_table_prints():
    model = encoder()
    opt = frozenopt.SGD(model, lr=0.1, momentum=0.9)
    opt.freeze("embeddings")
    train_step(model, opt)
    lines = str(opt.summary()).splitlines()
    assert lines[0].split() == ["module", "trainable", "frozen", "trainable", "%", "optimizer", "state"]
    assert lines[2].split() == ["embeddings", "0", "1,600", "0.00%", "0", "B"]
    assert lines[3].split() == ["encoder", "816", "0", "100.00%", "3.2", "KiB"]  # momentum: 816 x 4 bytes
    assert lines[4].split() == ["head", "34", "0", "100.00%", "136", "B"]
    assert lines[-1].split() == ["total", "850", "1,600", "34.69%", "3.3", "KiB"]
    assert repr(opt.summary()) == str(opt.summary())  # what the REPL shows


def test_depth_and_root_params():
    model = encoder()
    opt = frozenopt.Adam(model, lr=1e-3)
    opt.freeze("encoder.layer.1")
    rows = {r.name: (r.trainable, r.frozen) for r in opt.summary(depth=3).rows}
    assert rows == {"embeddings": (1600, 0), "encoder.layer.0": (272, 0), "encoder.layer.1": (0, 272),
                    "encoder.layer.2": (272, 0), "head": (34, 0)}
    linear = frozenopt.SGD(nn.Linear(3, 2), lr=0.1)  # the root module's own params are their own rows
    assert [(r.name, r.total) for r in linear.summary().rows] == [("weight", 6), ("bias", 2)]


def test_a_wrapper_every_param_lies_under_is_not_a_level():
    """PEFT's base_model.model, a lone backbone: depth counts below it; the rows keep full names."""
    model = nn.ModuleDict({"base_model": nn.ModuleDict({"model": encoder()})})
    opt = frozenopt.AdamW(model, lr=1e-3)
    opt.freeze("base_model.model.embeddings")
    names = [r.name for r in opt.summary().rows]
    assert names == ["base_model.model.embeddings", "base_model.model.encoder", "base_model.model.head"]
    assert opt.is_frozen(names[0])  # a row name is a target freeze/unfreeze take


def test_tied_params_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    opt = frozenopt.AdamW(Tied(), lr=1e-3)
    opt.freeze("lm_head")
    summary = opt.summary()
    assert [(r.name, r.trainable, r.frozen) for r in summary.rows] == [("wte", 0, 40)]
    assert summary.total.total == 40
    assert summary.notes == ["tied params are counted once, under their first name: wte.weight (= lm_head.weight)"]
    assert str(summary).endswith("note: " + summary.notes[0])


def test_params_without_names():
    model = encoder()
    model["embeddings"].requires_grad_(False)
    opt = frozenopt.SGD(model.parameters(), lr=0.1)
    summary = opt.summary()
    assert [(r.name, r.trainable, r.frozen) for r in summary.rows] == [("(unnamed)", 850, 1600)]
    assert len(summary.notes) == 1 and "9 param(s) were given to the optimizer without names" in summary.notes[0]
    assert "model.named_parameters()" in summary.notes[0]


@pytest.mark.parametrize("depth", [0, -1, 1.5, "1", True, None])
def test_bad_depth(depth):
    opt = frozenopt.SGD(encoder(), lr=0.1)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        opt.summary(depth=depth)
    assert opt.frozen == []
