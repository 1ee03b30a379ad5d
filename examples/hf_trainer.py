"""frozenopt with the Hugging Face Trainer: ``Trainer(optimizers=(opt, scheduler))``.

The usual BERT fine-tuning recipe (train only the last encoder layers, the pooler and the
classifier) on a tiny randomly initialised BERT (no download), then a callback thaws one
more layer mid-run on the same optimizer. Run: python examples/hf_trainer.py [--steps N]
"""

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import frozenopt


class Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 128, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class UnfreezeAt(TrainerCallback):
    def __init__(self, opt, step: int, *targets: str) -> None:
        self.opt, self.step, self.targets = opt, step, targets

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"step {self.step}: unfreezing {len(self.opt.unfreeze(*self.targets))} params")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)

    opt = frozenopt.AdamW(model, lr=5e-3)
    # Frozen: everything but the last two encoder layers, the pooler and the classifier
    opt.freeze("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, args.steps))
    embeddings = model.bert.embeddings.word_embeddings.weight.detach().clone()
    layer1 = model.bert.encoder.layer[1].output.dense.weight.detach().clone()
    layer3 = model.bert.encoder.layer[3].output.dense.weight.detach().clone()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                                  logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[],
                                  use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=Toy(), optimizers=(opt, sched),
                          callbacks=[UnfreezeAt(opt, args.steps // 2, "bert.encoder.layer.1")])
        trainer.train()

    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings), "frozen embeddings moved"
    assert not torch.equal(model.bert.encoder.layer[1].output.dense.weight, layer1), "layer 1 was thawed"
    assert not torch.equal(model.bert.encoder.layer[3].output.dense.weight, layer3), "layer 3 trains"
    print(f"done: {len(opt.frozen)} params still frozen")


if __name__ == "__main__":
    main()
