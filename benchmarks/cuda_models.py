"""Parameter shapes of a few well-known models (sizes only, nothing allocated),
for the CUDA bytes-moved model and the GPU benchmark."""

from __future__ import annotations


def _gpt2_small():
    d, v, ctx, layers = 768, 50257, 1024, 12
    sizes = [v * d, ctx * d]
    for _ in range(layers):
        sizes += [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return sizes + [d, d]


def _bert_base():
    d, v, layers = 768, 30522, 12
    sizes = [v * d, 512 * d, 2 * d, d, d]
    for _ in range(layers):
        sizes += [d * d, d] * 4 + [d, d, d * 4 * d, 4 * d, 4 * d * d, d, d, d]
    return sizes + [d * d, d]


def _llama_7b():
    d, ff, v, layers = 4096, 11008, 32000, 32
    sizes = [v * d]
    for _ in range(layers):
        sizes += [d * d] * 4 + [d * ff, d * ff, ff * d, d, d]
    return sizes + [d, v * d]


MODELS = {
    "gpt2-small": _gpt2_small,
    "bert-base": _bert_base,
    "llama-7b": _llama_7b,
    "many-small": lambda: [256] * 20_000,
    "large-tensors": lambda: [625_000] * 80,  # ~50M params in 80 tensors
}


def model_sizes(name: str) -> list[int]:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]()
