"""Worker for tests/test_expert_parallel.py, run by torchrun with 2 processes: compares transformers' expert parallelism
(ep_size 2, FSDP for the dense rest) against one process holding every expert, on the same weights and tokens."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModel
from transformers.distributed import DistributedConfig


def main(path: str) -> None:
    ids = torch.randint(5, 512, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    reference = AutoModel.from_pretrained(path, trust_remote_code=True).train()
    parallel = AutoModel.from_pretrained(
        path, trust_remote_code=True, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2)
    ).train()
    rank, world = dist.get_rank(), dist.get_world_size()
    experts = parallel.layers[1].mlp.experts
    assert experts.num_experts == reference.config.n_routed_experts // world, "each rank must hold a slice of the experts"

    def shard(r: int) -> slice:
        return slice(r * 2, (r + 1) * 2)

    out = parallel(input_ids=ids[shard(rank)], attention_mask=mask[shard(rank)]).last_hidden_state
    expected = reference(input_ids=ids[shard(rank)], attention_mask=mask[shard(rank)]).last_hidden_state
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    # Data-parallel gradients are averaged over ranks: the reference is the mean of the ranks' losses. The balance loss
    # reaches the routers with weight `aux_loss_weight` per forward whatever the loss is scaled by, so it is 1/world too.
    reference.aux_loss_weight = 1.0 / world
    sum(
        reference(input_ids=ids[shard(r)], attention_mask=mask[shard(r)]).last_hidden_state.pow(2).sum()
        for r in range(world)
    ).div(world).backward()
    for (name, param), ref_param in zip(parallel.named_parameters(), reference.parameters()):
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        # fp32 sums in another order (sharded compute, reduce-scatter): compare against the tensor's largest gradient
        error = (grad - ref_param.grad).abs().max() / ref_param.grad.abs().max()
        assert error < 2e-4, f"{name}: gradient differs by {error:.2e} of its largest element"
    print(f"rank {rank}: expert-parallel forward and gradients equal", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
