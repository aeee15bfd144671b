"""Int8 weight-only quantization of Chroma-MoE for CPU serving: every `nn.Linear`, the routed experts and the token
embeddings.

Format (one for all three kinds, stored as plain tensors so `save_pretrained` writes ordinary safetensors): symmetric
per-output-channel int8, `w ≈ q · s` with `q = round(w / s)` in [-127, 127] and `s = max|w_row| / 127` in fp32 — per
output row of a linear layer, per (expert, output row) of the 3-D expert weights `gate_up_proj (E, 2I, H)` /
`down_proj (E, H, I)`, per token row of the embedding table (the LLM.int8() paper's vector-wise weight quantization,
Dettmers et al. 2022, arXiv:2208.07339, without its outlier split). Activations stay fp32: each matmul converts its
int8 codes (a whole `nn.Linear`, or one expert's inside the experts backend) to fp32 right before the fp32 GEMM and
scales the GEMM's output columns, `x Wᵀ = (x Qᵀ) · s`, so the resident model is int8 while the arithmetic error is only
the weights' rounding. The router (routing decisions flip on
small logit changes; 0.1% of the parameters), RMSNorm gains and the pooling latents stay fp32.

The 3-D experts keep their module and are dispatched through transformers' experts interface, under the registered
implementation `"chroma_int8"` (`int8_experts_forward`). `ChromaMoeInt8Config` is a transformers quantization config:
a quantized model's `config.json` carries it, so `ChromaMoeForEmbedding.from_pretrained(folder)` (and
`SentenceTransformer(folder, trust_remote_code=True)`) rebuild the int8 modules before loading the int8 weights, and
`from_pretrained(fp32_folder, quantization_config=ChromaMoeInt8Config())` quantizes while loading.

This file ships beside `modeling_chroma_moe.py` in every model folder; importing it registers the quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "chroma_int8"
INT8_MAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: `weight (..., in)` -> `q (..., in)` int8 and `scale (...)` fp32 with
    `weight ≈ q * scale[..., None]`. An all-zero row gets scale 1 (its codes are 0 either way)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=-1) / INT8_MAX  # (...,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(weight / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes (..., in)` int8, `scale (...)` fp32 -> `(..., in)` in `dtype`."""
    return (codes * scale[..., None]).to(dtype)


def _int8_parameter(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.int8), requires_grad=False)


class ChromaMoeInt8Linear(nn.Module):
    """`nn.Linear` with an int8 `weight (out, in)` and fp32 `weight_scale (out,)`; `bias (out,)` stays fp32.
    Input `(..., in)` -> `(..., out)`. Inference only (int8 parameters take no gradient)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _int8_parameter((out_features, in_features))
        self.weight_scale = nn.Buffer(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> ChromaMoeInt8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.weight.data, module.weight_scale.data = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, self.weight.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))  # (..., out): (x Qᵀ) · s
        return output if self.bias is None else output.add_(self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class ChromaMoeInt8Embedding(nn.Module):
    """Token embeddings `weight (V, H)` in int8 with an fp32 scale per token row `weight_scale (V,)`.
    `input_ids (...)` -> `(..., H)` fp32."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _int8_parameter((num_embeddings, embedding_dim))
        self.weight_scale = nn.Buffer(torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> ChromaMoeInt8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim)
        module.weight.data, module.weight_scale.data = quantize_rows(embedding.weight)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(F.embedding(input_ids, self.weight), self.weight_scale[input_ids], torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def int8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts-interface backend for int8 `gate_up_proj (E, 2I, H)` / `down_proj (E, H, I)` with fp32 scales
    `gate_up_proj_scale (E, 2I)` / `down_proj_scale (E, H)`. Token slots are sorted by expert (as in transformers'
    `grouped_mm` backend); each expert's rows run one fp32 GEMM per projection against that expert's codes converted to
    fp32 (so only one expert's weights are ever held in fp32), written in place into one buffer, and the gate
    activation runs once over all slots. Experts that received no token are skipped.

    hidden_states (N, H), top_k_index / top_k_weights (N, K) -> (N, H).
    """
    num_tokens, top_k = top_k_index.shape
    dtype = hidden_states.dtype
    expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,) with S = N * K
    token = order // top_k  # (S,) source token of each sorted slot
    ends = torch.bincount(expert_ids, minlength=self.num_experts).cumsum(0).tolist()
    spans = [(expert, start, end) for expert, (start, end) in enumerate(zip([0, *ends[:-1]], ends)) if end > start]
    selected = hidden_states[token]  # (S, H)
    gate_up = selected.new_empty(selected.shape[0], self.gate_up_proj.shape[1])  # (S, 2I)
    for expert, start, end in spans:
        torch.mm(selected[start:end], self.gate_up_proj[expert].to(dtype).T, out=gate_up[start:end])
        gate_up[start:end] *= self.gate_up_proj_scale[expert].to(dtype)
    intermediate = self._apply_gate(gate_up)  # (S, I)
    down = selected.new_empty(selected.shape)  # (S, H)
    for expert, start, end in spans:
        torch.mm(intermediate[start:end], self.down_proj[expert].to(dtype).T, out=down[start:end])
        down[start:end] *= self.down_proj_scale[expert].to(dtype)
    down *= top_k_weights.reshape(-1)[order, None].to(dtype)
    return hidden_states.new_zeros(num_tokens, hidden_states.shape[1]).index_add_(0, token, down)


ALL_EXPERTS_FUNCTIONS.register(QUANT_METHOD, int8_experts_forward)


def _quantize_experts(experts: nn.Module, structure_only: bool) -> None:
    """Swap the experts' fp32 3-D weights for int8 ones plus scale buffers, in place (empty ones if `structure_only`)."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        if structure_only:
            codes, scale = torch.empty(weight.shape, dtype=torch.int8), torch.ones(weight.shape[:-1])
        else:
            codes, scale = quantize_rows(weight)
        setattr(experts, name, nn.Parameter(codes, requires_grad=False))
        experts.register_buffer(f"{name}_scale", scale)


def quantize_model_int8(model: nn.Module, structure_only: bool = False) -> nn.Module:
    """Quantize a `ChromaMoeForEmbedding` / `ChromaMoeModel` in place: every `nn.Linear` -> `ChromaMoeInt8Linear`, the
    token embeddings -> `ChromaMoeInt8Embedding`, the routed experts' 3-D weights -> int8 with the `"chroma_int8"`
    experts backend; the config gets `quantization_config` so a saved folder loads back as int8. `structure_only`
    builds empty int8 modules (for loading a quantized checkpoint). Raises `ValueError` for a model that is already
    quantized, has an MLM decoder (only the embedding model is served) or has a non-finite parameter."""
    if getattr(model.config, "quantization_config", None) is not None and not structure_only:
        raise ValueError("the model is already quantized (config.quantization_config is set)")
    if hasattr(model, "decoder"):
        raise ValueError("quantize the embedding model (ChromaMoeForEmbedding), not the masked-LM head model")
    if not structure_only:
        for name, parameter in model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise ValueError(f"parameter {name!r} has NaN or infinite values: it cannot be quantized")
    # Collected first: the module tree must not change while it is walked. Compared by class name: a folder loaded
    # with trust_remote_code has its own copy of the modeling classes.
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in (nn.Linear, nn.Embedding)
    ]
    for parent, name, child in swaps:
        if isinstance(child, nn.Linear):
            int8 = (
                ChromaMoeInt8Linear(child.in_features, child.out_features, child.bias is not None)
                if structure_only
                else ChromaMoeInt8Linear.from_float(child)
            )
        else:
            int8 = (
                ChromaMoeInt8Embedding(child.num_embeddings, child.embedding_dim)
                if structure_only
                else ChromaMoeInt8Embedding.from_float(child)
            )
        setattr(parent, name, int8)
    for module in model.modules():
        if type(module).__name__ == "ChromaMoeExperts":
            _quantize_experts(module, structure_only)
    model.set_experts_implementation(QUANT_METHOD)
    model.config.quantization_config = ChromaMoeInt8Config()
    return model


def int8_parameter_share(model: nn.Module) -> float:
    """Share of `model`'s parameters (elements) stored in int8; the fp32 scales are metadata, not parameters."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.dtype == torch.int8) / total


class ChromaMoeInt8Config(QuantizationConfigMixin):
    """transformers quantization config of the Chroma-MoE int8 format (no options: the format is fixed)."""

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD}


class ChromaMoeInt8Quantizer(HfQuantizer):
    """Builds the int8 modules before a quantized checkpoint's weights load (`pre_quantized`), or quantizes an fp32
    checkpoint right after loading it when `from_pretrained` is given `quantization_config=ChromaMoeInt8Config()`."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.pre_quantized:
            quantize_model_int8(model, structure_only=True)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            model.set_experts_implementation(QUANT_METHOD)
        else:
            model.config.quantization_config = None
            quantize_model_int8(model)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# A folder loaded with trust_remote_code imports a second copy of this file: register once.
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = ChromaMoeInt8Config
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = ChromaMoeInt8Quantizer


__all__ = [
    "ChromaMoeInt8Config",
    "ChromaMoeInt8Embedding",
    "ChromaMoeInt8Linear",
    "ChromaMoeInt8Quantizer",
    "dequantize_rows",
    "int8_experts_forward",
    "int8_parameter_share",
    "quantize_model_int8",
    "quantize_rows",
]
