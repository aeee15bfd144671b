"""Dense → MoE upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling", arXiv:2212.05055), exact for fine experts.

Phase 1 may train a dense model first and turn it into the MoE model part-way (``upcycle_at``). Sparse Upcycling copies
the dense FFN into every expert. Our experts are narrower than a dense FFN (fine-grained, DeepSeekMoE), so the dense
SwiGLU is *split by neurons* instead: a SwiGLU is a sum over its intermediate neurons n,
``FFN(x) = Σ_n down[:, n] · act(gate_n · x) · (up_n · x)``, so any partition of the neurons splits it into FFNs that add
up to it exactly. With a dense width equal to ``S + I`` (S = all shared experts together, I = one routed expert):

- the shared experts get the first S neurons;
- every routed expert gets a copy of the remaining I neurons;
- with ``norm_topk_prob=True`` the top-k gate weights sum to 1, so ``Σ_k w_k · E(x) = E(x)`` for identical experts:
  the MoE layer computes the dense FFN *exactly, whatever the router chooses*.

``dense_config_for`` gives the dense model to train first: the MoE config with no routed experts and FFN width
``S + I``. Layers that stay dense in the MoE model (``first_k_dense_replace``, ``moe_layer_freq``) may be wider there
(``intermediate_size``); they grow by extra neurons whose down-projection starts at zero, which adds nothing to the
output (function-preserving growth, as in Net2Net, Chen et al. 2016). Routers start small (near-uniform gate probabilities,
random enough to spread tokens over the experts); training and the balance loss then make the experts diverge.

The same mapping applies to AdamW's moments (``upcycle_tensors``), so phase 1 carries the optimizer state across the
switch instead of restarting Adam, as Sparse Upcycling does with the dense checkpoint's optimizer state.

Usage (a dense phase-1 model folder → an MoE model folder)::

    python -m train.upcycle --dense runs/dense/final --output runs/upcycled --preset chroma-moe-small \\
        --set norm_topk_prob=true
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForMaskedLM
from train.common import ConfigError, parse_override

ROUTER_INIT_STD = 1e-3
# Config fields upcycling may change (the FFN's shape and routing) or that only record provenance; every other field
# must match between the dense and the MoE model.
MAY_DIFFER = frozenset(
    {"n_routed_experts", "n_shared_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
     "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "router_aux_loss_coef",
     "router_bias_update_rate", "intermediate_size", "auto_map", "architectures", "transformers_version",
     "_name_or_path", "dtype"}
)  # fmt: skip
_FFN_KEY = re.compile(r"^(?P<prefix>.*layers\.(?P<layer>\d+)\.mlp\.)(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
GrowFill = Callable[[tuple[int, ...]], torch.Tensor]


def shared_width(config: ChromaMoeConfig) -> int:
    """Width S of all shared experts together (they run as one SwiGLU)."""
    return config.n_shared_experts * config.shared_expert_intermediate_size


def dense_config_for(moe_config: ChromaMoeConfig) -> ChromaMoeConfig:
    """The dense model to train before upcycling into ``moe_config``: identical except no routed experts and every FFN
    ``S + I`` wide, the width that upcycles exactly."""
    if moe_config.n_routed_experts <= 0:
        raise ConfigError("upcycling needs an MoE target: model.n_routed_experts must be > 0")
    config = copy.deepcopy(moe_config)
    config.n_routed_experts = 0
    config.intermediate_size = shared_width(moe_config) + moe_config.moe_intermediate_size
    return config


def check_upcyclable(dense_config: ChromaMoeConfig, moe_config: ChromaMoeConfig) -> None:
    """Raise ``ConfigError`` unless ``dense_config`` upcycles exactly into ``moe_config``."""
    if dense_config.n_routed_experts != 0:
        raise ConfigError(f"the dense model has n_routed_experts={dense_config.n_routed_experts}; it must be 0")
    if moe_config.n_routed_experts <= 0:
        raise ConfigError("upcycling needs an MoE target: model.n_routed_experts must be > 0")
    if not moe_config.norm_topk_prob:
        raise ConfigError(
            "upcycling is exact only with norm_topk_prob=True (the top-k gate weights must sum to 1); set "
            "model.norm_topk_prob=true"
        )
    dense_values, moe_values = dense_config.to_dict(), moe_config.to_dict()
    keys = (set(dense_values) | set(moe_values)) - MAY_DIFFER
    differing = sorted(k for k in keys if dense_values.get(k) != moe_values.get(k))
    if differing:
        raise ConfigError(f"dense and MoE configs differ outside the FFN in {differing}")
    width = shared_width(moe_config) + moe_config.moe_intermediate_size
    if dense_config.intermediate_size != width:
        raise ConfigError(
            f"dense intermediate_size={dense_config.intermediate_size} must equal the shared experts' total width "
            f"{shared_width(moe_config)} + one routed expert's width {moe_config.moe_intermediate_size} = {width}"
        )
    if moe_config.intermediate_size < width:
        raise ConfigError(
            f"MoE intermediate_size={moe_config.intermediate_size} (its dense layers) is below the dense width {width}"
        )


def upcycle_tensors(
    tensors: Mapping[str, torch.Tensor], dense_config: ChromaMoeConfig, moe_config: ChromaMoeConfig, grow_fill: GrowFill
) -> dict[str, torch.Tensor]:
    """Map tensors keyed by the dense model's parameter names (weights, or AdamW's ``exp_avg`` / ``exp_avg_sq``) to the
    MoE model's names and shapes. Routers are not produced (they are new). ``grow_fill(shape)`` fills the gate/up rows
    of neurons added to layers that stay dense (random for weights, zeros for moments); their down columns are zero."""
    check_upcyclable(dense_config, moe_config)
    shared, experts = shared_width(moe_config), moe_config.n_routed_experts
    grown = moe_config.intermediate_size - dense_config.intermediate_size
    out: dict[str, torch.Tensor] = {}
    ffn: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _FFN_KEY.match(name)
        if match:
            ffn.setdefault(match["prefix"], {})[match["proj"]] = tensor
        else:
            out[name] = tensor
    for prefix, proj in ffn.items():
        if set(proj) != {"gate_proj", "up_proj", "down_proj"}:
            raise ValueError(f"{prefix}: expected gate_proj, up_proj and down_proj, got {sorted(proj)}")
        gate, up, down = proj["gate_proj"], proj["up_proj"], proj["down_proj"]  # (D, H), (D, H), (H, D)
        layer = int(_FFN_KEY.match(prefix + "gate_proj.weight")["layer"])
        if moe_config.is_moe_layer(layer):
            if shared:
                out[prefix + "shared_experts.gate_proj.weight"] = gate[:shared].clone()
                out[prefix + "shared_experts.up_proj.weight"] = up[:shared].clone()
                out[prefix + "shared_experts.down_proj.weight"] = down[:, :shared].clone()
            gate_up = torch.cat([gate[shared:], up[shared:]], dim=0)  # (2I, H): gate rows first, then up rows
            out[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)  # (E, 2I, H)
            out[prefix + "experts.down_proj"] = down[:, shared:].unsqueeze(0).repeat(experts, 1, 1)  # (E, H, I)
        elif grown:
            hidden = gate.shape[1]
            out[prefix + "gate_proj.weight"] = torch.cat([gate, grow_fill((grown, hidden)).to(gate)])
            out[prefix + "up_proj.weight"] = torch.cat([up, grow_fill((grown, hidden)).to(up)])
            out[prefix + "down_proj.weight"] = torch.cat([down, down.new_zeros(down.shape[0], grown)], dim=1)
        else:
            out.update({prefix + f"{key}.weight": value for key, value in proj.items()})
    return out


def router_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of the router weights (``…mlp.gate.weight``) of an MoE model."""
    return [name for name, _ in model.named_parameters() if name.endswith(".mlp.gate.weight")]


def upcycle_model(
    dense_state: Mapping[str, torch.Tensor],
    dense_config: ChromaMoeConfig,
    moe_config: ChromaMoeConfig,
    *,
    seed: int = 0,
    router_std: float = ROUTER_INIT_STD,
) -> ChromaMoeForMaskedLM:
    """Build ``ChromaMoeForMaskedLM(moe_config)`` from a dense masked-LM state dict. Routers are drawn from
    N(0, router_std²) with a generator seeded by ``seed`` (identical on every process without a broadcast); neurons
    grown in dense layers draw their gate/up rows from N(0, initializer_range²)."""
    generator = torch.Generator().manual_seed(seed)
    std = moe_config.initializer_range

    def grow(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    model = ChromaMoeForMaskedLM(moe_config)
    weights = upcycle_tensors(dense_state, dense_config, moe_config, grow)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    routers = set(router_names(model))
    new = routers | {name.replace(".weight", ".expert_bias") for name in routers}
    if unexpected or set(missing) - new:
        raise ValueError(
            f"upcycled weights do not fit the MoE model: missing {sorted(set(missing) - new)}, unexpected {unexpected}"
        )
    with torch.no_grad():
        for name in sorted(routers):
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=generator) * router_std)
    return model


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.upcycle",
        description="Upcycle a dense Chroma-MoE masked-LM folder into an MoE model folder.",
    )
    parser.add_argument(
        "--dense", required=True, help="folder of a dense ChromaMoeForMaskedLM (save_pretrained output)"
    )
    parser.add_argument(
        "--output", required=True, help="folder to write the MoE model (and the dense folder's tokenizer)"
    )
    parser.add_argument("--preset", required=True, help="MoE preset, e.g. chroma-moe-small")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="MoE config overrides, e.g. norm_topk_prob=true"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        path, value = parse_override(item)
        overrides[".".join(path)] = value
    dense = ChromaMoeForMaskedLM.from_pretrained(args.dense)
    moe_config = ChromaMoeConfig.from_preset(args.preset, **{"vocab_size": dense.config.vocab_size, **overrides})
    model = upcycle_model(dense.state_dict(), dense.config, moe_config, seed=args.seed)
    model.save_pretrained(args.output)
    if (Path(args.dense) / "tokenizer.json").is_file():
        # not AutoTokenizer: it would read config.json's auto_map and ask to trust the model's remote code
        PreTrainedTokenizerFast.from_pretrained(args.dense).save_pretrained(args.output)
    else:
        print(f"no tokenizer.json in {args.dense}: saved the model only")
    print(f"upcycled {args.dense} -> {args.output}")


if __name__ == "__main__":
    main()
