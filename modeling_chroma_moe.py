"""Chroma-MoE: a bidirectional sparse Mixture-of-Experts encoder for text embeddings.

Blocks are pre-RMSNorm transformers with Multi-Head Latent Attention (DeepSeek-V2, arXiv:2405.04434) or grouped-query
attention, and a dense SwiGLU FFN (first layers) or a fine-grained MoE FFN of shared + routed experts (DeepSeekMoE,
arXiv:2401.06066). Attention is never causal. `ChromaMoeForEmbedding` pools the final token states with a latent-attention
head (NV-Embed, arXiv:2405.17428) into one embedding per text; `ChromaMoeForMaskedLM` is the phase-1 pretraining head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

try:
    from .configuration_chroma_moe import ChromaMoeConfig
    from .quantization_chroma_moe import ChromaMoeInt8Config  # noqa: F401 (registers the int8 quantizer: int8 folders load)
except ImportError:
    from configuration_chroma_moe import ChromaMoeConfig
    from quantization_chroma_moe import ChromaMoeInt8Config  # noqa: F401


@dataclass
class ChromaMoeModelOutput(ModelOutput):
    """Backbone output.

    Args:
        last_hidden_state: `(batch, seq, hidden)` final normed token states.
        hidden_states: per-block token states (embeddings first) when `output_hidden_states=True`.
        router_logits: per MoE layer, `(num_real_tokens, n_routed_experts)` fp32 router logits of the non-padding tokens,
            when `output_router_logits=True`.
        expert_counts: per MoE layer, `(n_routed_experts,)` number of tokens routed to each expert.
        aux_loss: the summed expert-balance loss of all MoE layers, *detached*: its gradient is already applied to the
            routers by `ChromaMoeAddAuxiliaryLoss` during the backward of whatever loss the caller computes, so adding
            it to a loss only changes the logged value.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_counts: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class ChromaMoeMaskedLMOutput(ModelOutput):
    """Masked-LM output. With `labels`, `logits` holds only the labelled positions, `(num_labelled, vocab)`, in
    row-major order of `labels != -100` — a full `(batch, seq, vocab)` tensor is mostly wasted at 15% masking."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_counts: tuple[torch.Tensor, ...] | None = None


@dataclass
class ChromaMoeEmbeddingOutput(ModelOutput):
    """Embedding output: `sentence_embedding` `(batch, embedding_dim)` plus the backbone's outputs."""

    sentence_embedding: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_counts: tuple[torch.Tensor, ...] | None = None


class ChromaMoeRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019), computed in fp32 for stability under bf16 autocast."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ChromaMoeRotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv:2104.09864); YaRN scaling through transformers' RoPE initialisers."""

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: ChromaMoeConfig) -> tuple[torch.Tensor, float]:
        """Inverse frequencies `(rotary_dim / 2,)` and the attention scaling of the configured RoPE type. Also called
        by `_init_weights`: a non-persistent buffer is not in the checkpoint and must be rebuilt after meta-device loading."""
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)
        dim = config.head_dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch, seq) -> cos, sin: (batch, seq, rotary_dim)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the channels: the (x1, x2) -> (-x2, x1) pairing of the half-split RoPE layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `(batch, heads, seq, rotary_dim)` by the angles of `cos`/`sin` `(batch, seq, rotary_dim)`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q kᵀ · scaling + mask) v. query `(B, H, T, Dq)`, key `(B, Hkv, T, Dq)`,
    value `(B, Hkv, T, Dv)` -> `(B, T, H, Dv)`; the additive mask is `(B, 1, T, T)`."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, Dv)
    return output, weights


class ChromaMoeMLAttention(nn.Module):
    """Multi-Head Latent Attention (DeepSeek-V2 §2.1, eq. 9-11 and 14-19).

    Keys and values are rebuilt from one low-rank latent `c_KV = W_DKV h` (eq. 9-11); queries are full-rank or go through
    their own low-rank latent `c_Q` (eq. 12-13). Position enters only through a decoupled RoPE part: per-head rotated
    query channels and ONE rotated key head shared by all heads (eq. 14-19). K and V are materialised: weight absorption
    only pays off for a decoding KV cache, which an encoder does not have.
    """

    def __init__(self, config: ChromaMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False  # sdpa_attention_forward reads this; True would silently make the encoder causal
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        self.scaling = self.qk_head_dim**-0.5

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=False)
            self.q_a_layernorm = ChromaMoeRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = ChromaMoeRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dnope+Drope)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed = self.kv_a_proj_with_mqa(hidden_states)  # (B, T, r_kv + Drope)
        c_kv, k_rope = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))  # (B, T, H * (Dnope + Dv))
        kv = kv.view(batch, seq, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B, H, T, Dnope), (B, H, T, Dv)

        cos, sin = position_embeddings
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, Drope): one key head shared by all heads
        query = torch.cat((q_nope, q_rope), dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(output.reshape(batch, seq, self.num_heads * self.v_head_dim))


class ChromaMoeGQAttention(nn.Module):
    """Grouped-query attention (Ainslie et al., arXiv:2305.13245) with RoPE on every head: the non-MLA alternative."""

    def __init__(self, config: ChromaMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(output.reshape(batch, seq, self.num_heads * self.head_dim))


class ChromaMoeMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, arXiv:2002.05202): down(act(gate(x)) * up(x))."""

    def __init__(self, config: ChromaMoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class ChromaMoeExperts(nn.Module):
    """The routed experts as 3-D weights, `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`.

    transformers' experts interface dispatches the forward by `config._experts_implementation`: `grouped_mm` (the
    default: one grouped GEMM per projection over expert-sorted tokens, `torch.nn.functional.grouped_mm`, with
    transformers' own kernel as fallback where torch has none) or `batched_mm`. The method below is the `eager`
    reference: a loop over the experts that received tokens.
    """

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (N, H), top_k_index / top_k_weights (N, K) -> (N, H)
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * top_k_weights[token, slot, None]
            output.index_add_(0, token, out.to(output.dtype))
        return output


class ChromaMoeAddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also sends gradient 1 into `aux_loss` (DeepSeek's `AddAuxiliaryLoss`).

    Attaching the balance loss to the layer output makes its gradient reach the router whatever loss is
    back-propagated through the model — including GradCache, which re-runs chunks and back-propagates only from cached
    embedding gradients, so a loss term kept beside the model would never be differentiated.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype, ctx.device = aux_loss.dtype, aux_loss.device
        return hidden

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_output, torch.ones((), dtype=ctx.dtype, device=ctx.device)


class ChromaMoeRouter(nn.Module):
    """Top-k softmax router over the routed experts, in fp32 on raw logits.

    `expert_bias` implements DeepSeek-V3's aux-loss-free balancing: it is added to the scores only to *choose* the top-k
    experts, never to the gate weights, and is moved outside of autograd by `update_bias`.
    """

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.expert_bias = nn.Buffer(torch.zeros(self.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden_states (N, H) -> logits, scores (N, E); top_k_weights (N, K); top_k_index (N, K)
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1)
        top_k_index = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        top_k_weights = scores.gather(1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, scores, top_k_weights, top_k_index

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor, rate: float) -> None:
        """b_i += rate · sign(mean load − load_i) (DeepSeek-V3 §2.1.2): overloaded experts get picked less."""
        load = expert_counts.float()
        self.expert_bias += rate * torch.sign(load.mean() - load)


def sequence_balance_loss(
    scores: torch.Tensor, top_k_index: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Sequence-wise expert-balance loss (DeepSeek-V2 eq. 12-14, per sequence as in DeepSeek-V3 eq. 17-20).

    For each sequence s with T_s real tokens: f_i = E / (K·T_s) · #{tokens of s routed to i}, P_i = mean over the tokens of
    s of the router probability s_i; L_s = Σ_i f_i P_i, which is 1 when routing is uniform and up to E/K when collapsed.
    Returns the mean of L_s over sequences. Padding never enters (only real tokens are routed). Being a mean of
    per-sequence terms, it splits exactly over GradCache chunks (see `ChromaMoeModel.aux_loss_weight`).

    scores (N, E) fp32, top_k_index (N, K), sequence_ids (N,) in [0, num_sequences) -> scalar.
    """
    num_tokens, num_experts = scores.shape
    top_k = top_k_index.shape[1]
    tokens_per_seq = torch.bincount(sequence_ids, minlength=num_sequences).clamp(min=1).to(scores.dtype)  # (S,)
    routed = torch.zeros(num_sequences, num_experts, dtype=scores.dtype, device=scores.device)
    routed.index_put_(
        (sequence_ids.repeat_interleave(top_k), top_k_index.reshape(-1)),
        torch.ones(num_tokens * top_k, dtype=scores.dtype, device=scores.device),
        accumulate=True,
    )  # (S, E) token counts per expert
    prob_sum = torch.zeros(num_sequences, num_experts, dtype=scores.dtype, device=scores.device)
    prob_sum.index_add_(0, sequence_ids, scores)  # (S, E)
    f = routed * (num_experts / top_k) / tokens_per_seq[:, None]
    p = prob_sum / tokens_per_seq[:, None]
    present = torch.bincount(sequence_ids, minlength=num_sequences) > 0
    return (f * p).sum(dim=-1)[present].mean()


class ChromaMoeSparseMoeBlock(nn.Module):
    """Fine-grained MoE FFN: shared experts every token uses plus top-k routed experts (DeepSeekMoE §3).

    Only non-padding tokens are routed and computed. During training the balance loss (weighted by
    `router_aux_loss_coef`) is attached to the output with `ChromaMoeAddAuxiliaryLoss`.
    """

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = ChromaMoeRouter(config)
        self.experts = ChromaMoeExperts(config)
        self.shared_experts = (
            ChromaMoeMLP(config, config.n_shared_experts * config.shared_expert_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None, aux_loss_weight: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states (B, T, H), token_mask (B, T) bool or None -> output (B, T, H), router logits (N, E) of the N
        real tokens, expert counts (E,), weighted balance loss (scalar, with graph)."""
        batch, seq, hidden = hidden_states.shape
        if token_mask is None:
            tokens = hidden_states.reshape(-1, hidden)  # (N, H)
            sequence_ids = torch.arange(batch, device=hidden_states.device).repeat_interleave(seq)
        else:
            tokens = hidden_states[token_mask]  # (N, H)
            sequence_ids = torch.nonzero(token_mask)[:, 0]
        logits, scores, top_k_weights, top_k_index = self.gate(tokens)
        routed = self.experts(tokens, top_k_index, top_k_weights.to(tokens.dtype))  # (N, H)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(tokens)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.gate.num_experts)

        coef = self.config.router_aux_loss_coef * aux_loss_weight
        aux_loss = coef * sequence_balance_loss(scores, top_k_index, sequence_ids, batch) if coef > 0 else scores.new_zeros(())
        if self.training and coef > 0 and torch.is_grad_enabled():
            routed = ChromaMoeAddAuxiliaryLoss.apply(routed, aux_loss)

        if token_mask is None:
            output = routed.view(batch, seq, hidden)
        else:
            output = hidden_states.new_zeros(batch, seq, hidden).masked_scatter(token_mask[..., None], routed)
        return output, logits, counts, aux_loss


class ChromaMoeLayer(GradientCheckpointingLayer):
    """Pre-RMSNorm encoder block: x + attn(norm(x)), then + ffn(norm(x)), where ffn is dense SwiGLU or MoE."""

    def __init__(self, config: ChromaMoeConfig, layer_idx: int) -> None:
        super().__init__()
        attention_cls = ChromaMoeMLAttention if config.attention_type == "mla" else ChromaMoeGQAttention
        self.self_attn = attention_cls(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = ChromaMoeSparseMoeBlock(config) if self.is_moe else ChromaMoeMLP(config, config.intermediate_size)
        self.input_layernorm = ChromaMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ChromaMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        aux_loss_weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """hidden_states (B, T, H) -> (B, T, H) and, for MoE layers, router logits, expert counts and balance loss."""
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        hidden_states = hidden_states + self.dropout(attn)
        normed = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            ffn, logits, counts, aux_loss = self.mlp(normed, token_mask, aux_loss_weight)
        else:
            ffn, logits, counts, aux_loss = self.mlp(normed), None, None, None
        return hidden_states + self.dropout(ffn), logits, counts, aux_loss


AUTO_MAP = {
    "AutoConfig": "configuration_chroma_moe.ChromaMoeConfig",
    "AutoModel": "modeling_chroma_moe.ChromaMoeModel",
    "AutoModelForMaskedLM": "modeling_chroma_moe.ChromaMoeForMaskedLM",
    "AutoModelForTextEncoding": "modeling_chroma_moe.ChromaMoeForEmbedding",
}


class ChromaMoePreTrainedModel(PreTrainedModel):
    """Weight init, attention/experts dispatch flags and Auto-class wiring shared by every Chroma-MoE head."""

    config_class = ChromaMoeConfig
    config: ChromaMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChromaMoeLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    def __init__(self, config: ChromaMoeConfig, *inputs: Any, **kwargs: Any) -> None:
        config.validate()  # a field set after the config was built is checked here, naming it, before any layer uses it
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, ChromaMoeRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config)[0])
        elif isinstance(module, ChromaMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, ChromaMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, ChromaMoePooling) and hasattr(module, "latents"):
            # unit-scale latents: they are attention queries/keys of their own, not residual-stream weights
            init.normal_(module.latents, mean=0.0, std=1.0)
        else:
            super()._init_weights(module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save with the family's full `auto_map`, whichever class is saved, so one folder loads through every Auto
        class (a phase-1 MLM checkpoint loads as `AutoModel` / `AutoModelForTextEncoding` in phase 2)."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def update_router_bias(self, expert_counts: tuple[torch.Tensor, ...]) -> None:
        """Aux-loss-free balancing step: call after each optimizer step with the `expert_counts` of the step's batches
        (summed over micro-batches and processes). No-op when `router_bias_update_rate` is 0."""
        rate = self.config.router_bias_update_rate
        if rate <= 0:
            return
        routers = [m for m in self.modules() if isinstance(m, ChromaMoeRouter)]
        if len(routers) != len(expert_counts):
            raise ValueError(f"expected expert counts for {len(routers)} MoE layers, got {len(expert_counts)}")
        for router, counts in zip(routers, expert_counts):
            router.update_bias(counts.to(router.expert_bias.device), rate)


class ChromaMoeModel(ChromaMoePreTrainedModel):
    """The bidirectional MoE encoder: token embeddings -> RMSNorm -> blocks -> final RMSNorm.

    The embeddings are normalised before entering the residual stream, as BERT and ModernBERT do for encoders: with
    0.02-std embeddings and unit-RMS sublayer inputs, the first attention output (nearly the same for every token of a
    sequence at initialisation) would be ~8x larger than the token's own embedding and wash out which token it was. A
    pooled embedding of the freshly initialised small preset then ranks TAT-QA passages at random (nDCG@10 0.02) instead
    of like a bag of its token embeddings (0.12), and a short contrastive run cannot recover the lexical signal.

    `aux_loss_weight` scales the balance-loss gradient attached in each MoE layer. It stays 1.0 except in GradCache,
    which re-runs a full batch of N texts in chunks of n and sets it to n / N so the chunks' sequence-wise balance losses
    add up to the full batch's.
    """

    # A folder saved from ChromaMoeForEmbedding also holds its pooling head; the bare encoder leaves it out.
    _keys_to_ignore_on_load_unexpected = [r"^pooler\."]

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_norm = ChromaMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([ChromaMoeLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ChromaMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ChromaMoeRotaryEmbedding(config)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.aux_loss_weight = 1.0
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ChromaMoeModelOutput | tuple:
        """input_ids (B, T), attention_mask (B, T) with 1 for real tokens -> `ChromaMoeModelOutput`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=inputs_embeds.device).expand(batch, seq)

        token_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            token_mask = attention_mask.bool()
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=token_mask
        )  # None, bool (B, 1, T, T) for sdpa, or additive float for eager
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = self.embed_dropout(self.embed_norm(inputs_embeds))  # (B, T, H), unit RMS per token
        all_hidden: list[torch.Tensor] = [hidden_states] if output_hidden_states else []
        router_logits: list[torch.Tensor] = []
        expert_counts: list[torch.Tensor] = []
        aux_loss = inputs_embeds.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            hidden_states, logits, counts, layer_aux = layer(
                hidden_states, position_embeddings, mask, token_mask, self.aux_loss_weight
            )
            if logits is not None:
                router_logits.append(logits)
                expert_counts.append(counts)
                aux_loss = aux_loss + layer_aux.detach()
            if output_hidden_states:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)

        output = ChromaMoeModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=tuple(router_logits) if output_router_logits else None,
            expert_counts=tuple(expert_counts),
            aux_loss=aux_loss,
        )
        return output if return_dict else output.to_tuple()


class ChromaMoeLMHead(nn.Module):
    """MLM prediction head: dense -> activation -> RMSNorm -> decoder tied to the input embeddings (BERT/ModernBERT)."""

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.act = ACT2FN["gelu"]
        self.norm = ChromaMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class ChromaMoeForMaskedLM(ChromaMoePreTrainedModel):
    """Phase-1 model: bidirectional masked-LM over the MoE encoder; loss = CE on labels ≠ -100 (+ balance loss)."""

    _tied_weights_keys = {"decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__(config)
        self.model = ChromaMoeModel(config)
        self.head = ChromaMoeLMHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ChromaMoeMaskedLMOutput | tuple:
        """labels (B, T) with -100 where no prediction is scored. With labels, only labelled positions are decoded."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        loss = None
        if labels is not None:
            selected = labels != -100
            logits = self.decoder(self.head(hidden[selected]))  # (num_labelled, V)
            loss = F.cross_entropy(logits.float(), labels[selected]) + outputs.aux_loss
        else:
            logits = self.decoder(self.head(hidden))  # (B, T, V)
        output = ChromaMoeMaskedLMOutput(
            loss=loss,
            logits=logits,
            aux_loss=outputs.aux_loss,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
            expert_counts=outputs.expert_counts,
        )
        return output if return_dict else output.to_tuple()


class ChromaMoePooling(nn.Module):
    """Pools token states `(B, T, H)` over `pooling_mask` `(B, T)` into `(B, embedding_dim)`.

    - `latent_attention` (the seed's form): `pooling_num_latents` trainable latent queries cross-attend (multi-head) to
      the token states; the latents' outputs are averaged. Keys/values are token states, so padding and instruction
      tokens are masked out of the attention itself.
    - `nv_embed` (NV-Embed §3.2): every token state is a query attending to a trainable latent array (keys = values),
      followed by a GELU MLP and a masked mean over the pooled tokens.
    - `mean`: masked mean of the token states.
    A final linear maps `hidden_size` to `embedding_dim` when they differ.
    """

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__()
        self.pooling_type = config.pooling_type
        hidden = config.hidden_size
        self.num_heads = config.pooling_num_heads
        if self.pooling_type in ("latent_attention", "nv_embed"):
            self.latents = nn.Parameter(torch.empty(config.pooling_num_latents, hidden))
            self.q_proj = nn.Linear(hidden, hidden, bias=False)
            self.k_proj = nn.Linear(hidden, hidden, bias=False)
            self.v_proj = nn.Linear(hidden, hidden, bias=False)
            self.o_proj = nn.Linear(hidden, hidden, bias=False)
        if self.pooling_type == "nv_embed":
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out_proj = nn.Linear(hidden, config.embedding_dim, bias=False) if config.embedding_dim != hidden else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, heads, L, H / heads)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor) -> torch.Tensor:
        mask = pooling_mask.bool()  # (B, T)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("pooling_mask leaves a text with no token to pool (all padding or all instruction)")
        batch = hidden_states.shape[0]
        if self.pooling_type == "latent_attention":
            query = self._heads(self.q_proj(self.latents).expand(batch, -1, -1))  # (B, h, L, d)
            key, value = self._heads(self.k_proj(hidden_states)), self._heads(self.v_proj(hidden_states))  # (B, h, T, d)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None, None, :])
            pooled = self.o_proj(attended.transpose(1, 2).flatten(2)).mean(dim=1)  # (B, H)
        else:
            if self.pooling_type == "nv_embed":
                query = self._heads(self.q_proj(hidden_states))  # (B, h, T, d)
                latents = self.latents.expand(batch, -1, -1)
                key, value = self._heads(self.k_proj(latents)), self._heads(self.v_proj(latents))  # (B, h, L, d)
                attended = F.scaled_dot_product_attention(query, key, value)
                hidden_states = self.mlp(self.o_proj(attended.transpose(1, 2).flatten(2)))  # (B, T, H)
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1)  # (B, H)
        return self.out_proj(pooled)


class ChromaMoeForEmbedding(ChromaMoePreTrainedModel):
    """Text-embedding model: the encoder plus a pooling head -> `sentence_embedding`.

    `pooling_mask` (defaults to `attention_mask`) selects the tokens that are pooled: an instruction prefix is attended to
    by every token but left out of the pooled representation (NV-Embed §3.3). A phase-1 `ChromaMoeForMaskedLM`
    checkpoint loads here directly (shared `model.` prefix); the pooling head is then freshly initialised.
    """

    def __init__(self, config: ChromaMoeConfig) -> None:
        super().__init__(config)
        self.model = ChromaMoeModel(config)
        self.pooler = ChromaMoePooling(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooling_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        normalize: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ChromaMoeEmbeddingOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if pooling_mask is None:
            pooling_mask = attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2], device=hidden.device)
        if attention_mask is not None:
            pooling_mask = pooling_mask.bool() & attention_mask.bool()
        embedding = self.pooler(hidden, pooling_mask)
        if self.config.normalize_embeddings if normalize is None else normalize:
            embedding = F.normalize(embedding, p=2, dim=-1)
        output = ChromaMoeEmbeddingOutput(
            sentence_embedding=embedding,
            last_hidden_state=hidden,
            aux_loss=outputs.aux_loss,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
            expert_counts=outputs.expert_counts,
        )
        return output if return_dict else output.to_tuple()


ChromaMoeConfig.register_for_auto_class()
ChromaMoeModel.register_for_auto_class("AutoModel")
ChromaMoeForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
ChromaMoeForEmbedding.register_for_auto_class("AutoModelForTextEncoding")


def count_parameters(config: ChromaMoeConfig) -> dict[str, int]:
    """Total and active parameters of `ChromaMoeForEmbedding(config)`, counted on the meta device (no memory used).

    Active = what one token touches: the embedding table once, attention, dense or shared FFNs, routers, the top-k of
    the routed experts, norms and the pooling head. The MLM head is not counted: it is not part of the shipped model.
    """
    with torch.device("meta"):
        model = ChromaMoeForEmbedding(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, ChromaMoeExperts):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            inactive += per_expert * (module.num_experts - config.num_experts_per_tok)
    return {"total": total, "active": total - inactive}


__all__ = [
    "ChromaMoePreTrainedModel",
    "ChromaMoeModel",
    "ChromaMoeForMaskedLM",
    "ChromaMoeForEmbedding",
    "count_parameters",
]
