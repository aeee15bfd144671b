"""Configuration of Chroma-MoE, a bidirectional sparse Mixture-of-Experts text-embedding model.

The architecture follows DeepSeek-V2 (Multi-Head Latent Attention and fine-grained shared + routed experts,
arXiv:2405.04434) in an encoder: attention is bidirectional and the output is pooled by a latent-attention head
(NV-Embed, arXiv:2405.17428) into one embedding per text.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

ATTENTION_TYPES = ("mla", "gqa")
POOLING_TYPES = ("latent_attention", "nv_embed", "mean")

# Presets. `chroma-moe-3b` keeps the seed's structure (d_model 2048, 28 layers, 64 routed + 2 shared experts, top-6,
# vocab 32,000, 8,192 positions). The seed's expert widths (routed 1·d, shared 4·d) would give ~22B parameters; to hit
# ~2.8B total / ~0.9B active the routed experts are narrow (192, "fine-grained" as in DeepSeekMoE, arXiv:2401.06066)
# and each of the two shared experts is 640 wide, so the always-on path carries most of the active FFN compute.
PRESETS: dict[str, dict[str, Any]] = {
    "chroma-moe-tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        pooling_num_latents=8,
        pooling_num_heads=4,
        embedding_dim=32,
    ),
    "chroma-moe-small": dict(
        vocab_size=32000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1024,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=512,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=8192,
        pooling_num_latents=32,
        pooling_num_heads=6,
        embedding_dim=384,
    ),
    "chroma-moe-3b": dict(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=28,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        intermediate_size=5632,
        n_routed_experts=64,
        n_shared_experts=2,
        moe_intermediate_size=192,
        shared_expert_intermediate_size=640,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        max_position_embeddings=8192,
        pooling_num_latents=512,
        pooling_num_heads=16,
        embedding_dim=768,
    ),
}


class ChromaMoeConfig(PreTrainedConfig):
    r"""Configuration of a Chroma-MoE model.

    Args:
        vocab_size: Number of tokens in the vocabulary (32,000 for the domain BPE of `tokenization/`).
        hidden_size: Width of the residual stream (d_model).
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Number of query heads.
        attention_type: `"mla"` (Multi-Head Latent Attention, DeepSeek-V2) or `"gqa"` (grouped-query attention).
        q_lora_rank: MLA rank of the low-rank query compression; `None` projects queries at full rank (as
            DeepSeek-V2-Lite does).
        kv_lora_rank: MLA rank of the joint key/value compression (the latent `c_KV`).
        qk_nope_head_dim: MLA per-head query/key width that carries no position information.
        qk_rope_head_dim: MLA per-head width of the decoupled RoPE part; its key is one head shared by all heads.
        v_head_dim: MLA per-head value width.
        num_key_value_heads: GQA number of key/value heads (must divide `num_attention_heads`); `None` = MHA.
        head_dim: GQA per-head width; `None` = `hidden_size // num_attention_heads`.
        max_position_embeddings: Longest sequence the rotary embedding is built for.
        rope_theta: RoPE base wavelength.
        rope_scaling: Optional YaRN context extension (arXiv:2309.00071), e.g.
            `{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}`. Stored with `rope_theta`
            in transformers' standard `rope_parameters`.
        intermediate_size: Width of the dense SwiGLU FFN used by the first `first_k_dense_replace` layers.
        hidden_act: Activation of every SwiGLU gate.
        n_routed_experts: Number of routed experts per MoE layer.
        n_shared_experts: Number of always-active shared experts per MoE layer (0 for none).
        moe_intermediate_size: Width of each routed expert.
        shared_expert_intermediate_size: Width of each shared expert; `None` = `moe_intermediate_size` (DeepSeek's
            convention). The shared experts run as one SwiGLU of width `n_shared_experts * shared_expert_intermediate_size`.
        num_experts_per_tok: Routed experts each token is sent to (top-k).
        first_k_dense_replace: The first k layers use the dense FFN instead of MoE (DeepSeek: lower layers route poorly).
        moe_layer_freq: After the dense layers, every `moe_layer_freq`-th layer is MoE, the others dense.
        norm_topk_prob: Renormalise the top-k gate weights to sum to one.
        router_aux_loss_coef: Weight α of the sequence-wise expert-balance loss (DeepSeek-V2 eq. 12-14). 0 disables it.
        router_bias_update_rate: Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2): per-expert bias added to
            the scores for expert *selection* only, moved by this step towards balance after each optimizer step
            (`ChromaMoePreTrainedModel.update_router_bias`). 0 disables it.
        pooling_type: `"latent_attention"` (trainable latent queries cross-attend to the token states — the seed's form),
            `"nv_embed"` (token states attend to a trainable latent array, MLP, masked mean — NV-Embed's form) or
            `"mean"` (masked mean).
        pooling_num_latents: Number of trainable latents of the pooling head.
        pooling_num_heads: Attention heads of the pooling head (must divide `hidden_size`).
        embedding_dim: Width of the output embedding (a linear projection from `hidden_size` when they differ).
        normalize_embeddings: L2-normalise `sentence_embedding` by default.
        rms_norm_eps: Epsilon of every RMSNorm.
        attention_dropout: Dropout on attention probabilities during training.
        hidden_dropout: Dropout on each block's residual branch outputs during training.
        initializer_range: Std of the normal initialiser.
        tie_word_embeddings: Tie the masked-LM decoder to the input embeddings.
    """

    model_type = "chroma_moe"
    attribute_map = {"num_experts": "n_routed_experts"}
    # Expert parallelism through transformers' own EP (`from_pretrained(..., distributed_config=DistributedConfig(
    # ep_size=N))`): each rank holds E/N routed experts and tokens travel by all-to-all.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        attention_type: str = "mla",
        q_lora_rank: int | None = None,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 8192,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        intermediate_size: int = 5632,
        hidden_act: str = "silu",
        n_routed_experts: int = 64,
        n_shared_experts: int = 2,
        moe_intermediate_size: int = 192,
        shared_expert_intermediate_size: int | None = 640,
        num_experts_per_tok: int = 6,
        first_k_dense_replace: int = 1,
        moe_layer_freq: int = 1,
        norm_topk_prob: bool = False,
        router_aux_loss_coef: float = 0.01,
        router_bias_update_rate: float = 0.0,
        pooling_type: str = "latent_attention",
        pooling_num_latents: int = 512,
        pooling_num_heads: int = 16,
        embedding_dim: int = 768,
        normalize_embeddings: bool = True,
        rms_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.attention_type = attention_type
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim  # derived below, once the fields it comes from are checked
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        for field, value in (("rope_scaling", rope_scaling), ("rope_parameters", rope_parameters)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"ChromaMoeConfig.{field}={value!r}: must be None or a dict")
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", **(rope_scaling or {})}
            rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters["rope_type"])
        self.rope_parameters = {**rope_parameters, "rope_theta": rope_parameters.get("rope_theta", rope_theta)}
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = (
            moe_intermediate_size if shared_expert_intermediate_size is None else shared_expert_intermediate_size
        )
        self.num_experts_per_tok = num_experts_per_tok
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_bias_update_rate = router_bias_update_rate
        self.pooling_type = pooling_type
        self.pooling_num_latents = pooling_num_latents
        self.pooling_num_heads = pooling_num_heads
        self.embedding_dim = embedding_dim
        self.normalize_embeddings = normalize_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        # Ours first: transformers' own validators (run inside `super().__init__`) would name `head_dim` for an odd
        # `qk_rope_head_dim` and fail with a bare TypeError on a None where a number belongs.
        self._validate()
        # transformers' RoPE initialisers read `head_dim` as the rotated width: in MLA only the decoupled part rotates.
        if attention_type == "mla":
            self.head_dim = qk_rope_head_dim
        elif head_dim is None:
            self.head_dim = hidden_size // num_attention_heads
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate(self) -> None:
        """Our checks, then transformers' (`save_pretrained` calls this): a field changed after construction is refused
        before it is saved, so what saves always loads. Raises `ValueError` naming the field."""
        self._validate()
        super().validate()

    def _validate(self) -> None:
        """Raise `ValueError` naming the field, its value and the rule, for any value no model can be built from:
        wrong types (a bool is not a number here; `None` only where the signature allows it) and ranges."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"ChromaMoeConfig.{field}={getattr(self, field)!r}: {why}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for field in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 0:
                fail(field, "must be an integer >= 0")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "embedding_dim", "pooling_num_latents", "pooling_num_heads"]
        if self.attention_type == "mla":
            positive += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if self.n_routed_experts > 0:  # the MoE fields matter only with routed experts (0 makes every layer dense)
            positive += ["num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq"]
            if self.n_shared_experts > 0:
                positive.append("shared_expert_intermediate_size")
        for field in positive:
            if not is_int(getattr(self, field)) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        for field in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if not is_number(getattr(self, field)) or getattr(self, field) <= 0:
                fail(field, "must be a positive number")
        for field in ("router_aux_loss_coef", "router_bias_update_rate"):
            if not is_number(getattr(self, field)) or getattr(self, field) < 0:
                fail(field, "must be a number >= 0")
        for field in ("attention_dropout", "hidden_dropout"):
            if not is_number(getattr(self, field)) or not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be a number in [0, 1)")
        for field in ("norm_topk_prob", "normalize_embeddings", "tie_word_embeddings"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "must be true or false")
        if self.attention_type not in ATTENTION_TYPES:
            fail("attention_type", f"must be one of {ATTENTION_TYPES}")
        if self.pooling_type not in POOLING_TYPES:
            fail("pooling_type", f"must be one of {POOLING_TYPES}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            fail("hidden_act", "must be an activation name of transformers.activations.ACT2FN, e.g. 'silu'")
        if self.attention_type == "mla":
            if self.q_lora_rank is not None and (not is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
                fail("q_lora_rank", "must be None (full-rank queries) or a positive integer")
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of channels)")
        else:
            if self.hidden_size % self.num_attention_heads:
                fail("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
            if self.head_dim is None and (self.hidden_size // self.num_attention_heads) % 2:
                fail("num_attention_heads", f"must divide hidden_size={self.hidden_size} into an even head width "
                     "(RoPE rotates pairs of channels), or set head_dim")  # fmt: skip
            if not is_int(self.num_key_value_heads) or self.num_key_value_heads <= 0 or (
                self.num_attention_heads % self.num_key_value_heads
            ):
                fail("num_key_value_heads", f"must be > 0 and divide num_attention_heads={self.num_attention_heads}")
            if self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2):
                fail("head_dim", "must be a positive even integer (None means hidden_size // num_attention_heads)")
        if self.n_routed_experts > 0 and self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"top-k must be in 1..n_routed_experts={self.n_routed_experts}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in 0..num_hidden_layers={self.num_hidden_layers}")
        if self.hidden_size % self.pooling_num_heads:
            fail("pooling_num_heads", f"must divide hidden_size={self.hidden_size}")
        if not isinstance(self.rope_parameters, dict) or self.rope_parameters.get("rope_type") not in ("default", "yarn"):
            fail("rope_parameters", "rope_type must be 'default' or 'yarn'")
        if self.rope_parameters["rope_type"] == "yarn":
            factor = self.rope_parameters.get("factor")
            if not is_number(factor) or factor < 1:
                fail("rope_parameters", f"the YaRN factor must be a number >= 1, got {factor!r}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` uses the MoE FFN (DeepSeek's `first_k_dense_replace` / `moe_layer_freq` rule)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx - self.first_k_dense_replace) % self.moe_layer_freq == 0
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ChromaMoeConfig":
        """Build a named preset (`chroma-moe-tiny`, `chroma-moe-small`, `chroma-moe-3b`), with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


__all__ = ["ChromaMoeConfig", "PRESETS"]
