"""frozenopt.integrations: the optimizer behind wrappers, the HF Trainer's decay grouping, freeze
schedules run by real HF Trainer and Lightning fits (resumed ones too), and PEFT's LoRA."""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import frozenopt
from frozenopt.integrations import FreezeSchedule, decay_param_groups, find_optimizer


def needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install {' '.join(missing)})")


def test_no_framework_is_imported_until_its_callbacks_are():
    code = ("import sys, frozenopt, frozenopt.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ find_optimizer

class Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_find_optimizer_behind_wrappers():
    model = nn.Linear(3, 2)
    opt = frozenopt.AdamW(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert find_optimizer(opt) is opt
    assert find_optimizer(Wrapper(Wrapper(opt))) is opt  # e.g. a Trainer holding an AcceleratedOptimizer
    assert find_optimizer(sched) is opt
    assert find_optimizer([torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), opt]) is opt
    trainer_like = Wrapper(None)
    trainer_like.optimizers = [Wrapper(opt)]  # Lightning's Trainer.optimizers
    assert find_optimizer(trainer_like) is opt
    looped = Wrapper(None)
    looped.optimizer = looped
    with pytest.raises(TypeError, match=r"no frozenopt optimizer behind Wrapper \(looked at: Wrapper\)"):
        find_optimizer(looped)


def test_find_optimizer_errors():
    torch_opt = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    with pytest.raises(TypeError, match=r"no frozenopt optimizer behind Wrapper \(looked at: Wrapper, AdamW\)"):
        find_optimizer(Wrapper(torch_opt))
    a, b = frozenopt.SGD(nn.Linear(2, 2), lr=0.1), frozenopt.SGD(nn.Linear(2, 2), lr=0.1)
    with pytest.raises(ValueError, match="2 frozenopt optimizers behind list"):
        find_optimizer([a, Wrapper(b)])
    assert find_optimizer([a, Wrapper(a)]) is a  # the same one reached twice


def test_freeze_schedule_without_a_framework():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = frozenopt.SGD(model, lr=0.1)
    plan = FreezeSchedule({2: "0", 3: "1"}, freeze=["0", "1"])
    with pytest.raises(RuntimeError, match="before start"):
        plan.advance(0)
    assert plan.start(Wrapper(opt)) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [plan.advance(t) for t in range(4)] == [[], [], ["0.weight", "0.bias"], ["1.weight", "1.bias"]]
    assert plan.state_dict() == {"last": 3, "applied": [2, 3]}
    restored = FreezeSchedule({2: "0", 3: "1"}, freeze=["0", "1"])
    restored.load_state_dict({"last": 2, "applied": [2]})  # what a checkpoint taken during epoch 2 holds
    assert restored.start(opt) == [] and restored.resumed and restored.advance(2) == []
    # resumed after 2.5 epochs without a saved schedule state: nothing frozen again, the entry at 2 counts as run
    opt2 = frozenopt.SGD(model, lr=0.1)
    opt2.freeze("1")  # what the resumed optimizer's checkpoint would restore
    resumed = FreezeSchedule({2: "0", 3: "1"}, freeze=["0", "1"])
    assert resumed.start(opt2, done=2.5) == [] and resumed.resumed
    assert resumed.advance(2) == [] and resumed.advance(3) == ["1.weight", "1.bias"]
    # keep_norm: the LayerNorm inside the frozen targets stays trainable
    block = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Linear(4, 2))
    opt3 = frozenopt.SGD(block, lr=0.1)
    kept = FreezeSchedule({1: "0"}, freeze="0", keep_norm=True)
    assert kept.start(opt3, block) == ["0.0.weight", "0.0.bias"]
    assert kept.advance(1) == ["0.0.weight", "0.0.bias"]
    with pytest.raises(ValueError, match="keep_norm=True needs the model"):
        FreezeSchedule(freeze="0", keep_norm=True).start(opt3)


# ------------------------------------------------------------------ the HF Trainer's decay groups

def tiny_hf_models():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    return {
        "bert": BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=2)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)),
        "t5": T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                  num_heads=2)),
        "custom": nn.ModuleDict({"ln": nn.LayerNorm(4), "block": nn.ModuleDict({
            "norm": nn.Linear(4, 4), "q_norm": nn.Linear(4, 4), "normal": nn.Linear(4, 4, bias=False),
            "rmsnorm_scale": nn.Linear(4, 4, bias=False)})}),
    }


@needs("transformers", "accelerate")
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "custom"])
def test_decay_param_groups_match_the_trainer(name, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_hf_models()[name]
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.05, report_to=[], use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Trainer's notes on models it does not know
        trainer = Trainer(model=model, args=args)
    theirs = trainer.create_optimizer().param_groups
    ours = decay_param_groups(model, 0.05)
    assert [[p for _, p in g["params"]] for g in ours] == [g["params"] for g in theirs if g["params"]]
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs if g["params"]]
    decayed = trainer.get_decay_parameter_names(model)
    assert [n for n, _ in ours[0]["params"]] == [n for n, _ in model.named_parameters() if n in decayed]
    if name == "gpt2":  # tied lm_head: freezing by either name works
        opt = frozenopt.AdamW(ours)
        assert opt.freeze("lm_head") == ["transformer.wte.weight (= lm_head.weight)"]


def test_decay_param_groups_keep_params_that_start_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = decay_param_groups(model, 0.1, lr=1e-3)
    assert [[n for n, _ in g["params"]] for g in groups] == [["0.weight", "2.weight"],
                                                             ["0.bias", "1.weight", "1.bias", "2.bias"]]
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.1, 1e-3), (0.0, 1e-3)]
    opt = frozenopt.AdamW(groups)
    assert opt.frozen == ["0.weight", "0.bias"]
    assert decay_param_groups(nn.LayerNorm(3), 0.1)[0]["weight_decay"] == 0.1  # the root's type is not looked at
    with pytest.raises(TypeError, match=r"takes the model \(an nn.Module\), got generator"):
        decay_param_groups(model.named_parameters(), 0.1)


# ------------------------------------------------------------------------- a real HF Trainer run

class Toy(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


FROZEN_AT_START = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]


def hf_run(out, steps, *, by="step", resume=None, save_steps=None):
    """A Trainer fit of the tiny BERT with frozenopt AdamW in the Trainer's decay groups; returns
    (model, opt, trainer, moved) where moved[layer] lists, after each step, whether that layer moved."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from frozenopt.integrations.huggingface import FreezeCallback

    model = tiny_bert()
    opt = frozenopt.AdamW(decay_param_groups(model, 0.01), lr=5e-3)
    start = {i: model.bert.encoder.layer[i].output.dense.weight.detach().clone() for i in range(3)}
    moved = {i: [] for i in range(3)}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for i in range(3):
                moved[i].append(not torch.equal(model.bert.encoder.layer[i].output.dense.weight, start[i]))

    schedule = {2: "bert.encoder.layer.1", 6: "bert.encoder.layer.0"} if by == "step" else {1: "bert.encoder.layer.1"}
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Toy(), optimizers=(opt, None),
                      callbacks=[FreezeCallback(schedule, freeze=FROZEN_AT_START, by=by), Watch()])
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer, moved


@needs("transformers", "accelerate")
def test_hf_trainer_runs_a_freeze_schedule(tmp_path):
    model, opt, trainer, moved = hf_run(tmp_path, 8)
    assert trainer.optimizer is not opt and not hasattr(trainer.optimizer, "freeze")  # accelerate's wrapper
    assert find_optimizer(trainer.optimizer) is opt and find_optimizer(trainer) is opt
    assert moved[2] == [True] * 8
    assert moved[1] == [False] * 2 + [True] * 6  # unfrozen before step 2 (counted from 0)
    assert moved[0] == [False] * 6 + [True] * 2
    assert len(opt.param_groups) == 2
    assert opt.frozen == [n for n, _ in model.named_parameters() if n.startswith("bert.embeddings.")]


@needs("transformers", "accelerate")
def test_hf_trainer_by_epoch(tmp_path):
    _, _, _, moved = hf_run(tmp_path, 8, by="epoch")  # 64 samples / 16: 4 steps an epoch
    assert moved[1] == [False] * 4 + [True] * 4 and moved[0] == [False] * 8


@needs("transformers", "accelerate")
def test_hf_trainer_resume_keeps_the_frozen_set(tmp_path):
    """Resumed at step 4 (after the unfreeze at 2, before the one at 6): layer 1 is not frozen
    again, layer 0 thaws at 6, and the run ends bitwise where the uninterrupted one does."""
    whole, opt, _, _ = hf_run(tmp_path / "whole", 8, save_steps=4)
    resumed, opt2, _, moved = hf_run(tmp_path / "again", 8, save_steps=4,
                                     resume=str(tmp_path / "whole" / "checkpoint-4"))
    assert moved[1] == [True] * 4 and moved[0] == [False] * 2 + [True] * 2  # the 4 steps run after the resume
    assert opt2.frozen == opt.frozen
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@needs("transformers", "accelerate")
def test_hf_trainer_resume_by_epoch_in_the_middle_of_an_epoch(tmp_path):
    """Resumed at step 6, halfway through epoch 1 (4 steps an epoch): the entry for epoch 1 ran
    before the checkpoint and does not run again; the run ends bitwise as the uninterrupted one."""
    whole, opt, _, _ = hf_run(tmp_path / "whole", 8, by="epoch", save_steps=6)
    resumed, opt2, _, moved = hf_run(tmp_path / "again", 8, by="epoch", save_steps=6,
                                     resume=str(tmp_path / "whole" / "checkpoint-6"))
    assert moved[1] == [True] * 2 and moved[0] == [False] * 2
    assert opt2.frozen == opt.frozen
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ Lightning

def lightning_module(lrs):
    import lightning as L

    class LitNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32))
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            assert find_optimizer(self.optimizers()) is self.trainer.optimizers[0]  # behind LightningOptimizer
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def on_train_epoch_end(self):
            opt = self.trainer.optimizers[0]
            lrs.append((len(opt.param_groups), opt.param_groups[0]["lr"]))

        def configure_optimizers(self):
            opt = frozenopt.SGD(self, lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return LitNet()


def lightning_fit(callback, epochs, out=None, ckpt_path=None):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = (x @ torch.randn(16, 3, generator=g)).argmax(1)
    lrs = []
    module = lightning_module(lrs)
    start = module.backbone[0].weight.detach().clone()
    moved, frozen = [], []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            moved.append(not torch.equal(pl_module.backbone[0].weight, start))
            frozen.append(find_optimizer(trainer).frozen)

    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1)] if out else []
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(out), num_sanity_val_steps=0,
                        callbacks=[callback, Watch(), *checkpoints])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on few dataloader workers
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16), ckpt_path=ckpt_path)
    return module, trainer, moved, lrs, frozen


@needs("lightning")
def test_lightning_backbone_finetuning(tmp_path):
    from frozenopt.integrations.lightning import BackboneFinetuning

    _, trainer, moved, lrs, frozen = lightning_fit(BackboneFinetuning(2, train_bn=True), 4)
    assert moved == [False, False, True, True]
    assert lrs == [(1, 0.05), (1, 0.025), (1, 0.0125), (1, 0.00625)]  # one group throughout, StepLR as usual
    # train_bn: the BatchNorm inside the frozen backbone trains all along
    backbone = ["backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.3.bias"]
    assert frozen == [backbone, backbone, [], []]
    _, _, _, _, frozen = lightning_fit(BackboneFinetuning(2, train_bn=False), 3)
    assert frozen[0] == backbone[:2] + ["backbone.1.weight", "backbone.1.bias"] + backbone[2:]


@needs("lightning")
def test_lightning_resume_does_not_freeze_again(tmp_path):
    """Resumed from the checkpoint of epoch 1 (the backbone thawed at its start), the backbone
    is not frozen again and the run goes on exactly as the uninterrupted one."""
    from frozenopt.integrations.lightning import BackboneFinetuning

    whole, _, moved, lrs, _ = lightning_fit(BackboneFinetuning(1), 4, out=tmp_path)
    assert moved == [False, True, True, True]
    ckpt = next(tmp_path.glob("epoch=1-*.ckpt"))
    resumed, trainer, moved2, lrs2, _ = lightning_fit(BackboneFinetuning(1), 4, ckpt_path=str(ckpt))
    assert moved2 == [True, True] and lrs2 == lrs[2:]
    assert find_optimizer(trainer).frozen == []
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@needs("lightning")
def test_lightning_schedule_by_step_and_hooks():
    from frozenopt.integrations.lightning import FreezeCallback

    seen = []

    class Logged(FreezeCallback):
        def freeze_before_training(self, pl_module, optimizer):
            seen.append(("start", list(optimizer.frozen)))

        def finetune_function(self, pl_module, epoch, optimizer):
            seen.append((epoch, list(optimizer.frozen)))

    # 4 steps an epoch: the backbone thaws before step 6, in the middle of epoch 1
    _, _, moved, _, _ = lightning_fit(Logged({6: "backbone"}, freeze="backbone", by="step"), 3)
    frozen = ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.3.weight",
              "backbone.3.bias"]
    assert seen == [("start", frozen), (0, frozen), (1, frozen), (2, [])]
    assert moved == [False, True, True]
    with pytest.raises(ValueError, match="by must be 'step' or 'epoch'"):
        FreezeCallback({1: "backbone"}, by="batch")


# -------------------------------------------------------------------------------------- PEFT

def test_peft_lora_and_a_bare_unfreeze():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and not any("query.base_layer" in n for n in trainable)
    opt = frozenopt.AdamW(model, lr=1e-2)
    summary = opt.summary()
    assert (summary.total.trainable, summary.total.total) == model.get_nb_trainable_parameters()
    assert [r.name for r in summary.rows] == ["base_model.model.bert", "base_model.model.classifier"]

    with pytest.warns(UserWarning, match="with PEFT .* full fine-tuning"):
        opt.unfreeze()
    assert opt.summary().total.frozen == 0  # what a bare unfreeze() does: every base weight trains
    assert opt.reset_frozen()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    batch = Toy()[0]
    base = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight.detach().clone()
    lora = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B.default.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(**{k: v[None] for k, v in batch.items()}).loss.backward()
        opt.step()
    assert torch.equal(model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight, base)
    assert not torch.equal(model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B.default.weight,
                           lora)
