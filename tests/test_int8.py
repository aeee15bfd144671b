"""CPU int8 serving (`quantization_chroma_moe`, `chroma_moe_inference.quantize_int8`) on the tiny preset: each int8
layer computes exactly its dequantized fp32 counterpart, the int8 model's embeddings stay close to fp32, ≥ 95% of the
parameters are int8, a saved int8 folder is int8 on disk and loads back (transformers, and SentenceTransformer in a
fresh process from the folder alone) to identical embeddings, and quantizing while loading gives the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sentence_transformers import SentenceTransformer
from torch import nn

from chroma_moe_inference import int8_parameter_share, quantize_int8
from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeExperts, ChromaMoeForEmbedding, ChromaMoeForMaskedLM
from quantization_chroma_moe import (
    ChromaMoeInt8Config,
    ChromaMoeInt8Embedding,
    ChromaMoeInt8Linear,
    dequantize_rows,
    quantize_model_int8,
    quantize_rows,
)
from sentence_chroma_moe import build_sentence_transformer, save_sentence_transformer
from tokenization.train import train_tokenizer

TEXTS = [
    "Net revenue rose 12% to $4.1 billion in fiscal 2019, driven by higher interest income.",
    "The company reported an operating loss of EUR 3.2 million for the third quarter.",
    "HDMI cable 2m, 4K 60Hz, gold-plated connectors, braided nylon.",
    "Women's running shoes, breathable mesh upper, size 8.",
    "Der Umsatz stieg im Geschäftsjahr um zwölf Prozent.",
    "What was the change in revenue between 2018 and 2019?",
]


@pytest.fixture(scope="module")
def st_model() -> SentenceTransformer:
    tokenizer = train_tokenizer(TEXTS * 8, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")).eval()
    return build_sentence_transformer(model, tokenizer)


@pytest.fixture(scope="module")
def int8_model(st_model) -> SentenceTransformer:
    return quantize_int8(st_model)


def test_quantize_rows_is_symmetric_per_row_within_half_a_step():
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.54, 1.27, -0.1]])
    codes, scale = quantize_rows(weight)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.tensor([1.0 / 127, 1.0, 2.54 / 127]))
    assert codes.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -5]]  # 63.5 rounds half to even: 64
    error = (dequantize_rows(codes, scale, torch.float32) - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-7)


def test_int8_layers_compute_their_dequantized_fp32_counterparts():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    int8_linear = ChromaMoeInt8Linear.from_float(linear)
    x = torch.randn(5, 16)
    dequantized = dequantize_rows(int8_linear.weight, int8_linear.weight_scale, torch.float32)
    torch.testing.assert_close(int8_linear(x), F.linear(x, dequantized, linear.bias), rtol=1e-5, atol=1e-6)

    embedding = nn.Embedding(10, 4)
    int8_embedding = ChromaMoeInt8Embedding.from_float(embedding)
    ids = torch.tensor([[3, 0, 9], [1, 1, 2]])
    table = dequantize_rows(int8_embedding.weight, int8_embedding.weight_scale, torch.float32)
    torch.testing.assert_close(int8_embedding(ids), table[ids], rtol=0, atol=0)

    # The int8 experts backend against transformers' eager loop on the dequantized weights: same tokens, same sums.
    config = ChromaMoeConfig.from_preset("chroma-moe-tiny")
    model = ChromaMoeForEmbedding(config).eval()
    quantize_model_int8(model)
    experts = model.model.layers[1].mlp.experts
    reference = ChromaMoeExperts(ChromaMoeConfig.from_preset("chroma-moe-tiny"))  # its own config: eager dispatch
    reference.config._experts_implementation = "eager"
    reference.gate_up_proj.data = dequantize_rows(experts.gate_up_proj, experts.gate_up_proj_scale, torch.float32)
    reference.down_proj.data = dequantize_rows(experts.down_proj, experts.down_proj_scale, torch.float32)
    hidden = torch.randn(40, config.hidden_size)
    top_k_index = torch.stack([torch.randperm(config.n_routed_experts)[:2] for _ in range(40)])  # (N, K)
    top_k_index[:, 0] = top_k_index[:, 0].clamp(max=3)  # leave some experts without tokens
    top_k_weights = torch.rand(40, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            experts(hidden, top_k_index, top_k_weights), reference(hidden, top_k_index, top_k_weights), rtol=1e-5, atol=1e-6
        )


def test_int8_model_is_close_to_fp32_and_mostly_int8(st_model, int8_model):
    backbone = int8_model[0].model
    assert type(backbone.model.embed_tokens) is ChromaMoeInt8Embedding
    assert type(backbone.model.layers[0].self_attn.o_proj) is ChromaMoeInt8Linear
    experts = backbone.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.int8
    assert backbone.config._experts_implementation == "chroma_int8"
    assert backbone.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert type(st_model[0].model.model.layers[0].self_attn.o_proj) is nn.Linear  # the original is untouched

    # Share of int8 parameters, counted independently on the fp32 model: every nn.Linear / nn.Embedding weight and the
    # experts' 3-D weights; left in fp32 are norms, routers, pooling latents and (none in this preset) biases.
    fp32 = st_model[0].model
    int8_weights = [m.weight for m in fp32.modules() if isinstance(m, (nn.Linear, nn.Embedding))] + [
        w for m in fp32.modules() if isinstance(m, ChromaMoeExperts) for w in (m.gate_up_proj, m.down_proj)
    ]
    expected = sum(w.numel() for w in int8_weights) / sum(p.numel() for p in fp32.parameters())
    share = int8_parameter_share(backbone)
    assert share == pytest.approx(expected, abs=1e-12)
    assert sum(p.numel() for p in backbone.parameters()) == sum(p.numel() for p in fp32.parameters())
    assert share >= 0.95

    cosine = F.cosine_similarity(
        st_model.encode(TEXTS, convert_to_tensor=True), int8_model.encode(TEXTS, convert_to_tensor=True)
    )
    print(f"\nint8 vs fp32 cosine over {len(TEXTS)} texts: mean {cosine.mean():.6f}, min {cosine.min():.6f}; "
          f"int8 parameter share {share:.4f}")  # fmt: skip
    assert cosine.min() > 0.999


def test_saved_int8_folder_is_int8_on_disk_and_loads_to_identical_embeddings(st_model, int8_model, tmp_path):
    save_sentence_transformer(st_model, tmp_path / "fp32")
    save_sentence_transformer(int8_model, tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "chroma_int8"}
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "I8"
        assert weights.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_dtype() == "I8"
        assert weights.get_slice("model.layers.1.mlp.experts.down_proj_scale").get_dtype() == "F32"
        assert weights.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
    size_ratio = (tmp_path / "int8" / "model.safetensors").stat().st_size / (
        tmp_path / "fp32" / "model.safetensors"
    ).stat().st_size
    assert size_ratio < 0.40

    expected = int8_model.encode(TEXTS, convert_to_numpy=True)
    loaded = ChromaMoeForEmbedding.from_pretrained(tmp_path / "int8")
    assert type(loaded.model.embed_tokens) is ChromaMoeInt8Embedding
    assert loaded.config._experts_implementation == "chroma_int8"
    reloaded = build_sentence_transformer(loaded, int8_model.tokenizer)
    np.testing.assert_array_equal(reloaded.encode(TEXTS, convert_to_numpy=True), expected)
    save_sentence_transformer(reloaded, tmp_path / "resaved")  # a loaded int8 model saves again, unchanged
    resaved = ChromaMoeForEmbedding.from_pretrained(tmp_path / "resaved")
    np.testing.assert_array_equal(
        build_sentence_transformer(resaved, int8_model.tokenizer).encode(TEXTS, convert_to_numpy=True), expected
    )

    # SentenceTransformer in a fresh process that sees only the folder (no repository on the path).
    script = textwrap.dedent(f"""
        import numpy as np
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(tmp_path / "int8")!r}, trust_remote_code=True, device="cpu")
        backbone = model[0].model
        assert type(backbone.model.embed_tokens).__name__ == "ChromaMoeInt8Embedding", type(backbone.model.embed_tokens)
        assert type(backbone).__module__.startswith("transformers_modules."), type(backbone).__module__
        np.save("int8.npy", model.encode({TEXTS!r}, convert_to_numpy=True))
        from transformers import AutoModelForTextEncoding  # plain transformers, nothing imported by hand
        auto = AutoModelForTextEncoding.from_pretrained({str(tmp_path / "int8")!r}, trust_remote_code=True)
        assert type(auto.model.embed_tokens).__name__ == "ChromaMoeInt8Embedding", type(auto.model.embed_tokens)
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "int8.npy"), expected)


def test_quantization_config_quantizes_an_fp32_folder_while_loading(st_model, int8_model, tmp_path):
    save_sentence_transformer(st_model, tmp_path / "fp32")
    loaded = ChromaMoeForEmbedding.from_pretrained(tmp_path / "fp32", quantization_config=ChromaMoeInt8Config())
    assert loaded.config.quantization_config.to_dict() == {"quant_method": "chroma_int8"}
    reloaded = build_sentence_transformer(loaded, int8_model.tokenizer)
    np.testing.assert_array_equal(
        reloaded.encode(TEXTS, convert_to_numpy=True), int8_model.encode(TEXTS, convert_to_numpy=True)
    )


def test_quantizing_the_wrong_model_gives_clear_errors(st_model, int8_model):
    with pytest.raises(ValueError, match=r"already quantized \(config.quantization_config is set\)"):
        quantize_model_int8(int8_model[0].model)
    with pytest.raises(ValueError, match="quantize the embedding model"):
        quantize_model_int8(ChromaMoeForMaskedLM(ChromaMoeConfig.from_preset("chroma-moe-tiny")))
    broken = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny"))
    with torch.no_grad():
        broken.model.layers[2].mlp.experts.down_proj[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 'model.layers.2.mlp.experts.down_proj' has NaN or infinite values"):
        quantize_model_int8(broken)
    with pytest.raises(TypeError, match="expected a Chroma-MoE SentenceTransformer, got first module Linear"):
        quantize_int8(SentenceTransformer(modules=[nn.Linear(2, 2)]))
