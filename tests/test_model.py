"""Model core: shapes, bidirectionality, padding invariance, MLA against the paper's equations, MoE dispatch, balance
loss, config validation, parameter counts, Auto-class round trips and gradient checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import (
    ChromaMoeForEmbedding,
    ChromaMoeForMaskedLM,
    ChromaMoeMLAttention,
    ChromaMoeModel,
    ChromaMoeSparseMoeBlock,
    count_parameters,
    sequence_balance_loss,
)

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> ChromaMoeConfig:
    return ChromaMoeConfig.from_preset("chroma-moe-tiny", **overrides)


def random_ids(batch: int, seq: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling_type", ["latent_attention", "nv_embed", "mean"])
def test_forward_backward_shapes(pooling_type):
    torch.manual_seed(0)
    config = tiny(pooling_type=pooling_type)
    model = ChromaMoeForEmbedding(config).train()
    ids = random_ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    model(input_ids=ids, attention_mask=mask).sentence_embedding.sum().backward()  # warm-up: first-call kernel setup
    model.zero_grad(set_to_none=True)
    # CPU time of this process on one thread: other load on the machine does not count, and no OpenMP thread spins
    # waiting for a core that another process holds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        out = model(input_ids=ids, attention_mask=mask)
        out.sentence_embedding.pow(2).sum().backward()
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert out.sentence_embedding.shape == (2, config.embedding_dim)
    assert out.last_hidden_state.shape == (2, 16, config.hidden_size)
    assert torch.allclose(out.sentence_embedding.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert len(out.expert_counts) == 2 and all(c.sum() == 11 * 2 + 16 * 2 for c in out.expert_counts)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"parameters without gradient: {missing}"
    assert elapsed < 1.0, f"tiny forward+backward of 2x16 tokens took {elapsed:.2f}s of CPU time"


def test_masked_lm_loss_and_tied_head():
    torch.manual_seed(0)
    model = ChromaMoeForMaskedLM(tiny())
    ids = random_ids(2, 12)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    out = model(input_ids=ids, labels=labels)
    assert model.decoder.weight is model.model.embed_tokens.weight
    assert out.logits.shape == (2, 512)
    expected = F.cross_entropy(out.logits, ids[:, 3]) + out.aux_loss
    assert torch.allclose(out.loss, expected)
    assert model(input_ids=ids).logits.shape == (2, 12, 512)


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_bidirectional(attention_type):
    torch.manual_seed(0)
    overrides = {"num_key_value_heads": 2} if attention_type == "gqa" else {}
    model = ChromaMoeModel(tiny(attention_type=attention_type, **overrides)).eval()
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 7) % 500 + 5
    first = model(input_ids=ids).last_hidden_state[0, 0]
    first_changed = model(input_ids=changed).last_hidden_state[0, 0]
    assert not torch.allclose(first, first_changed, atol=1e-4), "the first token must see the last one"


@pytest.mark.parametrize("pooling_type", ["latent_attention", "nv_embed", "mean"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_invariance(pooling_type, attn_implementation):
    torch.manual_seed(0)
    config = tiny(pooling_type=pooling_type)
    config._attn_implementation = attn_implementation
    model = ChromaMoeForEmbedding(config).eval()
    text = random_ids(1, 7, seed=1)
    longer = random_ids(1, 19, seed=2)
    alone = model(input_ids=text, attention_mask=torch.ones_like(text)).sentence_embedding[0]

    padded_ids = torch.cat([text, torch.full((1, 5), config.pad_token_id)], dim=1)
    padded_mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    padded = model(input_ids=padded_ids, attention_mask=padded_mask).sentence_embedding[0]

    batch_ids = torch.cat([torch.cat([text, torch.full((1, 12), config.pad_token_id)], dim=1), longer])
    batch_mask = torch.tensor([[1] * 7 + [0] * 12, [1] * 19])
    batched = model(input_ids=batch_ids, attention_mask=batch_mask).sentence_embedding[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as in RoFormer eq. 34 on the half-split layout: channel i pairs with i + d/2, angle = pos * theta^(-2i/d)."""
    dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None].double() * freqs[None]  # (T, d/2)
    x1, x2 = x[..., : dim // 2].double(), x[..., dim // 2 :].double()
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_matches_paper_equations(q_lora_rank):
    """DeepSeek-V2 eq. 9-19 written out per head in float64, against the module."""
    torch.manual_seed(0)
    config = tiny(q_lora_rank=q_lora_rank)
    attn = ChromaMoeMLAttention(config, 0).double().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    seq, heads = 6, config.num_attention_heads
    dn, dr, dv, r = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
    h = torch.randn(1, seq, config.hidden_size, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    x = h[0]
    if q_lora_rank is None:
        q = x @ attn.q_proj.weight.T  # W^Q h
    else:
        c_q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight)  # eq. 12: c_Q = W^DQ h
        q = c_q @ attn.q_b_proj.weight.T  # eq. 13 + 16: q^C = W^UQ c_Q, q^R = RoPE(W^QR c_Q)
    q = q.view(seq, heads, dn + dr)
    compressed = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = rms(compressed[:, :r], attn.kv_a_layernorm.weight)  # eq. 9: c_KV = W^DKV h
    k_r = rope_reference(compressed[:, r:], torch.arange(seq), config.rope_theta)  # eq. 17: one shared k^R
    kv = (c_kv @ attn.kv_b_proj.weight.T).view(seq, heads, dn + dv)  # eq. 10-11: k^C = W^UK c_KV, v^C = W^UV c_KV
    outputs = []
    for i in range(heads):
        q_i = torch.cat([q[:, i, :dn], rope_reference(q[:, i, dn:], torch.arange(seq), config.rope_theta)], -1)
        k_i = torch.cat([kv[:, i, :dn], k_r], -1)  # eq. 18
        scores = q_i @ k_i.T / (dn + dr) ** 0.5
        scores = scores.masked_fill(~mask[0][None, :], float("-inf"))  # no causal mask: bidirectional
        outputs.append(scores.softmax(-1) @ kv[:, i, dn:])  # eq. 19
    expected = torch.cat(outputs, -1) @ attn.o_proj.weight.T

    model_mask = torch.where(mask[:, None, None, :], 0.0, float("-inf")).double()
    cos_sin = ChromaMoeModel(config).rotary_emb(h, torch.arange(seq)[None])
    got = attn(h, tuple(t.double() for t in cos_sin), model_mask)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)  # cos/sin tables are fp32


def moe_block(implementation: str, seed: int = 0) -> ChromaMoeSparseMoeBlock:
    config = ChromaMoeConfig.from_preset(
        "chroma-moe-tiny", n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, hidden_size=32,
        pooling_num_heads=4,
    )
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    block = ChromaMoeSparseMoeBlock(config).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block


def test_grouped_dispatch_equals_per_expert_loop():
    grouped, loop = moe_block("grouped_mm"), moe_block("eager")
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(3, 10, 32)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    results = []
    for block in (grouped, loop):
        inputs = x.clone().requires_grad_(True)
        out, logits, counts, aux = block(inputs, mask, 1.0)
        (out.pow(2).sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        results.append((out, counts, inputs.grad, grads))
    (out_g, counts_g, dx_g, grads_g), (out_l, counts_l, dx_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts_g, counts_l)
    torch.testing.assert_close(dx_g, dx_l, atol=1e-5, rtol=1e-5)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=1e-5, rtol=1e-5, msg=name)
    assert float(out_g[0, 6:].abs().sum()) == 0.0, "padding tokens must not be routed or computed"


def test_balance_loss_balanced_lower_than_collapsed():
    tokens, experts, k = 64, 8, 2
    sequence_ids = torch.arange(2).repeat_interleave(tokens // 2)
    balanced_scores = torch.full((tokens, experts), 1.0 / experts)
    balanced_index = torch.stack([torch.arange(tokens) % experts, (torch.arange(tokens) + 1) % experts], dim=1)
    collapsed_scores = F.one_hot(torch.zeros(tokens, dtype=torch.long), experts).float() * 0.9 + 0.1 / experts
    collapsed_index = torch.tensor([[0, 1]]).expand(tokens, k)
    balanced = sequence_balance_loss(balanced_scores, balanced_index, sequence_ids, 2)
    collapsed = sequence_balance_loss(collapsed_scores, collapsed_index, sequence_ids, 2)
    assert torch.isclose(balanced, torch.tensor(1.0))
    assert collapsed > 3 * balanced


def test_aux_loss_gradient_reaches_router_through_identity():
    """Backprop from the output only (as GradCache does): the router gradient must include the balance-loss term."""
    x = torch.randn(2, 8, 32, dtype=torch.float64)  # float64 around the fp32 router: the check subtracts gradients
    grads = {}
    for coef in (0.0, 1.0):
        block = moe_block("eager").double()
        block.config.router_aux_loss_coef = coef
        out, _, _, aux = block(x, None, 1.0)
        out.sum().backward()
        grads[coef] = block.gate.weight.grad.clone()
    diff = grads[1.0] - grads[0.0]
    assert diff.abs().max() > 1e-6, "the aux loss must change the router gradient"

    block = moe_block("eager").double()
    block.config.router_aux_loss_coef = 1.0
    out, _, _, aux = block(x, None, 1.0)
    expected = torch.autograd.grad(aux, block.gate.weight, retain_graph=True)[0]
    torch.testing.assert_close(diff, expected, atol=1e-6, rtol=1e-4)  # the router runs in fp32


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_experts_per_tok", 9),
        ("num_attention_heads", 5),
        ("kv_lora_rank", 0),
        ("q_lora_rank", -1),
        ("attention_type", "linear"),
        ("pooling_type", "cls"),
        ("pooling_num_heads", 3),
        ("first_k_dense_replace", 7),
        ("hidden_dropout", 1.5),
        ("router_aux_loss_coef", -0.1),
        ("rope_scaling", {"rope_type": "ntk"}),
    ],
)
def test_validation_names_the_field(field, value):
    overrides = {field: value}
    if field == "num_attention_heads":
        overrides["attention_type"] = "gqa"
    expected_field = "rope_parameters" if field == "rope_scaling" else field
    with pytest.raises(ValueError, match=expected_field):
        tiny(**overrides)


def test_3b_counts_within_bounds():
    counts = count_parameters(ChromaMoeConfig.from_preset("chroma-moe-3b"))
    assert abs(counts["total"] / 2.8e9 - 1) <= 0.05, counts
    assert abs(counts["active"] / 0.9e9 - 1) <= 0.10, counts
    small = count_parameters(ChromaMoeConfig.from_preset("chroma-moe-small"))
    assert 20e6 <= small["total"] <= 60e6, small


def test_yarn_rope_runs():
    config = tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    model = ChromaMoeModel(config).eval()
    assert model.rotary_emb.attention_scaling > 1.0
    assert torch.isfinite(model(input_ids=random_ids(1, 300)).last_hidden_state).all()


def test_gqa_variant_runs():
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(tiny(attention_type="gqa", num_key_value_heads=2))
    out = model(input_ids=random_ids(2, 9), attention_mask=torch.ones(2, 9, dtype=torch.long))
    out.sentence_embedding.sum().backward()
    assert out.sentence_embedding.shape == (2, 32)
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None


def test_gradient_checkpointing_equal_gradients():
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(tiny()).train()
    ids, mask = random_ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, attention_mask=mask).sentence_embedding.pow(3).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_router_bias_update_moves_towards_balance():
    model = ChromaMoeModel(tiny(router_bias_update_rate=0.01))
    counts = tuple(torch.tensor([10, 0, 0, 0, 0, 0, 0, 6]) for _ in range(2))
    model.update_router_bias(counts)
    bias = model.layers[1].mlp.gate.expert_bias
    assert bias[0] < 0 < bias[1] and bias[7] < 0


def test_save_load_through_auto_classes_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = ChromaMoeForMaskedLM(tiny()).eval()
    model.save_pretrained(tmp_path / "mlm")
    auto_map = json.loads((tmp_path / "mlm" / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForTextEncoding"} <= set(auto_map)
    ids = random_ids(2, 10)
    torch.save(
        {
            "ids": ids,
            "hidden": model.model(input_ids=ids).last_hidden_state,
            "logits": model(input_ids=ids).logits,
        },
        tmp_path / "ref.pt",
    )
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        path = {str(tmp_path / 'mlm')!r}
        assert AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == "chroma_moe"
        base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
        torch.testing.assert_close(base(input_ids=ref["ids"]).last_hidden_state, ref["hidden"], atol=0, rtol=0)
        torch.testing.assert_close(mlm(input_ids=ref["ids"]).logits, ref["logits"], atol=0, rtol=0)
        print("OK", type(base).__name__, type(mlm).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ChromaMoeModel ChromaMoeForMaskedLM" in result.stdout


def test_the_bare_encoder_loads_an_embedding_folder_without_unexpected_keys(tmp_path: Path) -> None:
    """`AutoModel` on a folder saved from ChromaMoeForEmbedding (every Hub folder) takes the encoder and leaves the
    pooling head out quietly: no key reported unexpected or missing, the encoder's weights exact."""
    torch.manual_seed(0)
    embedding = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny"))
    embedding.save_pretrained(tmp_path / "embedding")
    base, info = ChromaMoeModel.from_pretrained(tmp_path / "embedding", output_loading_info=True)
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []
    assert not info["missing_keys"]
    for name, tensor in embedding.model.state_dict().items():
        assert torch.equal(base.state_dict()[name], tensor), name
