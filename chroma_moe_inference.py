"""Inference helpers for a Chroma-MoE `SentenceTransformer`: routing introspection and CPU int8 weight quantization.

Kept out of `sentence_chroma_moe.py` (which ships inside every model folder as remote code) because plotting needs
matplotlib, which plain users of the model should not have to install.

- `route(model, texts)`: which routed experts every token used in every MoE layer, and with what gate weight — read from
  the model's own routers (forward hooks), so it is exactly what the forward pass computed, expert bias and
  `norm_topk_prob` included.
- `routing_shares` / `plot_routing`: per group of texts (a domain, a language), the share of tokens routed to each
  expert in each MoE layer, as a layers × experts heatmap, to see whether experts specialise by domain or language.
- `quantize_int8(model)`: a CPU copy with int8 weights in every `nn.Linear`, the routed experts (3-D weights, through
  the experts interface) and the token embeddings — symmetric per-output-channel int8 with fp32 scales, fp32
  activations (`quantization_chroma_moe`, which ships in every model folder so a saved int8 model loads back as int8).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import nn

from quantization_chroma_moe import int8_parameter_share, quantize_model_int8
from sentence_chroma_moe import ChromaMoeSentenceEncoder


@dataclass
class TextRouting:
    """Routing of one text. `tokens` are its T real tokens (specials included: they are routed too); for every MoE
    layer index, `experts[layer]` `(T, K)` are the chosen expert ids and `weights[layer]` `(T, K)` their gate weights,
    each row sorted by decreasing weight."""

    text: str
    tokens: list[str]
    experts: dict[int, torch.Tensor]
    weights: dict[int, torch.Tensor]


def _encoder(model: SentenceTransformer | ChromaMoeSentenceEncoder) -> ChromaMoeSentenceEncoder:
    """The Chroma-MoE input module of `model`. Compared by class name: a folder loaded with `trust_remote_code` has its
    own copy of the class."""
    encoder = model[0] if isinstance(model, SentenceTransformer) else model
    if type(encoder).__name__ != ChromaMoeSentenceEncoder.__name__:
        raise TypeError(f"expected a Chroma-MoE SentenceTransformer, got first module {type(encoder).__name__}")
    return encoder


def moe_layer_indices(model: SentenceTransformer | ChromaMoeSentenceEncoder) -> list[int]:
    """Indices of the MoE blocks of the backbone, in order."""
    return [index for index, layer in enumerate(_encoder(model).model.model.layers) if layer.is_moe]


@torch.inference_mode()
def route(
    model: SentenceTransformer | ChromaMoeSentenceEncoder, texts: Sequence[str], *, batch_size: int = 32
) -> list[TextRouting]:
    """Per text, the experts each token was routed to in every MoE layer and their gate weights (no prompt added).

    The routers' outputs are captured with forward hooks; each router sees the batch's real tokens flattened in
    row-major order of the attention mask (`ChromaMoeSparseMoeBlock`), which is how they are split back per text.
    """
    encoder = _encoder(model)
    layers = moe_layer_indices(encoder)
    if not layers:
        raise ValueError("the model has no MoE layer (n_routed_experts=0 or first_k_dense_replace=num_hidden_layers)")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(layer_index: int):
        def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
            _, _, top_k_weights, top_k_index = output  # (N, K) each
            captured[layer_index] = (top_k_weights, top_k_index)

        return hook

    backbone = encoder.model.model
    handles = [backbone.layers[i].mlp.gate.register_forward_hook(hook_for(i)) for i in layers]
    was_training = encoder.training
    encoder.eval()
    results: list[TextRouting] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            features = encoder.preprocess(batch)
            device = next(encoder.parameters()).device
            encoder.model.model(
                input_ids=features["input_ids"].to(device), attention_mask=features["attention_mask"].to(device)
            )
            lengths = features["attention_mask"].sum(dim=1).tolist()  # (B,)
            per_layer = {}
            for i in layers:
                weights, index = captured.pop(i)
                weights, order = weights.float().cpu().sort(dim=-1, descending=True)  # (N, K)
                per_layer[i] = (weights.split(lengths), index.cpu().gather(1, order).split(lengths))
            for row, text in enumerate(batch):
                ids = features["input_ids"][row, : lengths[row]].tolist()
                results.append(
                    TextRouting(
                        text=text,
                        tokens=encoder.tokenizer.convert_ids_to_tokens(ids),
                        experts={i: per_layer[i][1][row] for i in layers},
                        weights={i: per_layer[i][0][row] for i in layers},
                    )
                )
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    return results


def routing_shares(
    model: SentenceTransformer | ChromaMoeSentenceEncoder, groups: dict[str, Sequence[str]]
) -> dict[str, np.ndarray]:
    """For every group of texts, a `(num_moe_layers, n_routed_experts)` array: the share of the group's tokens that
    chose each expert in each MoE layer. A row sums to top-k; uniform routing gives top-k / E everywhere."""
    encoder = _encoder(model)
    num_experts = encoder.model.config.n_routed_experts
    layers = moe_layer_indices(encoder)
    shares = {}
    for name, texts in groups.items():
        if not texts:
            raise ValueError(f"routing group {name!r} has no texts")
        counts = np.zeros((len(layers), num_experts))
        num_tokens = 0
        for routing in route(encoder, texts):
            num_tokens += len(routing.tokens)
            for row, layer in enumerate(layers):
                counts[row] += np.bincount(routing.experts[layer].reshape(-1).numpy(), minlength=num_experts)
        shares[name] = counts / num_tokens
    return shares


def plot_routing(
    model: SentenceTransformer | ChromaMoeSentenceEncoder, groups: dict[str, Sequence[str]], path: str | os.PathLike
) -> dict[str, np.ndarray]:
    """Save a heatmap per group (rows: MoE layers, columns: experts, colour: share of the group's tokens, on one shared
    scale) side by side to `path`, and return the `routing_shares` it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = routing_shares(model, groups)
    layers = moe_layer_indices(model)
    top = max(float(share.max()) for share in shares.values())
    width = max(3.0, 0.25 * next(iter(shares.values())).shape[1])
    size = (width * len(shares) + 1.5, 0.5 * len(layers) + 1.8)
    figure, axes = plt.subplots(1, len(shares), figsize=size, squeeze=False, sharey=True)
    for axis, (name, share) in zip(axes[0], shares.items()):
        image = axis.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        axis.set_title(f"{name} ({len(groups[name])} texts)")
        axis.set_xlabel("expert")
    axes[0][0].set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    figure.colorbar(image, ax=axes[0].tolist(), label="share of tokens routed to the expert")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return shares


def quantize_int8(model: SentenceTransformer) -> SentenceTransformer:
    """A CPU copy of a Chroma-MoE `model` with int8 weights (`quantization_chroma_moe.quantize_model_int8`: every
    `nn.Linear`, the routed experts and the token embeddings; router, norms and pooling latents stay fp32); the
    original is left untouched. The copy is for inference; `save_sentence_transformer(copy, folder)` writes an int8
    folder (safetensors) that `SentenceTransformer(folder, trust_remote_code=True)` loads as int8 again.
    Raises `TypeError` for a model whose first module is not a Chroma-MoE encoder."""
    _encoder(model)
    quantized = copy.deepcopy(model).to("cpu").eval()
    quantize_model_int8(_encoder(quantized).model)
    return quantized


__all__ = [
    "TextRouting",
    "int8_parameter_share",
    "moe_layer_indices",
    "plot_routing",
    "quantize_int8",
    "route",
    "routing_shares",
]
