"""FSDP2 sharding of a diffusers UNet (and of the networks a loss trains) for
``lightning.pytorch.strategies.ModelParallelStrategy``.

The strategy builds a 2-D device mesh ("data_parallel", "tensor_parallel") before
``configure_model``; the module shards its trainable UNet there with ``fully_shard`` (per-parameter
DTensor sharding), one unit per UNet block, then the root. Frozen parts (VAE, text encoder) are
never sharded: each rank keeps a full copy, as under DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from instaflow.contracts import ShardingAware

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision_policy(name: str | None):
    """FSDP2 policy: parameters all-gathered in ``name`` (bf16), gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name is None:
        return MixedPrecisionPolicy()
    if name not in MIXED_PRECISION:
        raise ValueError(f"fsdp_mixed_precision must be one of {sorted(MIXED_PRECISION)} or null, got {name!r}")
    return MixedPrecisionPolicy(param_dtype=MIXED_PRECISION[name], reduce_dtype=torch.float32)


def _cast_inputs_keep_timestep(dtype: torch.dtype):
    """Root pre-forward hook: sample and text states to ``dtype``, the timestep stays fp32.

    FSDP2 would cast every floating input, and bf16 rounds a timestep near 1000 to steps of 4.
    """
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        args = (args[0].to(dtype),) + tuple(args[1:]) if args and torch.is_tensor(args[0]) else args
        if torch.is_tensor(kwargs.get("encoder_hidden_states")):
            kwargs = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].to(dtype)}
        return args, kwargs

    return hook


def check_callbacks(trainer) -> None:
    """Refuse callbacks that would run a sharded UNet on one rank: its all-gathers would wait forever.

    Each callback is asked (``contracts.ShardingAware``); one that does not say is assumed to be safe.
    """
    found = [type(c).__name__ for c in (trainer.callbacks if trainer is not None else [])
             if isinstance(c, ShardingAware) and not c.supports_sharded_module()]
    if found:
        raise ValueError(f"{found} sample with the UNet on rank 0 only, but under FSDP2 every rank must take part in "
                         "each forward (parameter all-gathers), so the run would hang: drop it from trainer.callbacks "
                         "for sharded runs (EMA, Export and ImageGrid sample on every rank)")


def is_sharded(module: nn.Module) -> bool:
    """True when ``fully_shard`` has been applied to ``module`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_unet(unet: nn.Module, mesh, mixed_precision: str | None = None) -> nn.Module:
    """``fully_shard`` each down/mid/up block of a UNet2DConditionModel, then the UNet itself (in place).

    ``mesh`` is the strategy's device mesh; only its "data_parallel" dimension is used (tensor
    parallelism of the UNet is not implemented, so "tensor_parallel" must have size 1).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"tensor parallelism is not implemented for the UNet (tensor_parallel_size="
                         f"{mesh['tensor_parallel'].size()}): set strategy.init_args.tensor_parallel_size: 1 and "
                         "data_parallel_size to the number of devices")
    dp_mesh = data_parallel_mesh(mesh)
    policy = mixed_precision_policy(mixed_precision)
    blocks = list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else []) + list(unet.up_blocks)
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    if mixed_precision is None:
        fully_shard(unet, mesh=dp_mesh, mp_policy=policy)
    else:  # the root casts its own inputs (timestep kept fp32) and returns fp32 for the loss
        root = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                    output_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(unet, mesh=dp_mesh, mp_policy=root)
        unet.register_forward_pre_hook(_cast_inputs_keep_timestep(policy.param_dtype), with_kwargs=True, prepend=True)
    return unet


def data_parallel_mesh(mesh):
    """The "data_parallel" dimension of the strategy's mesh (the whole mesh when it has no named dimensions)."""
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


def shard_network(net: nn.Module, mesh, mixed_precision: str | None = None) -> nn.Module:
    """``fully_shard`` a network a loss trains (a discriminator, a fake-score model) as one FSDP2 unit (in place).

    The same mesh and mixed-precision policy as the student's UNet (``shard_unet``); one unit, because such
    networks are small beside the student (a loss with a large one can shard its blocks before this call:
    ``fully_shard`` on an already sharded child is kept).
    """
    from torch.distributed.fsdp import fully_shard

    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"{type(net).__name__} has no trainable parameters: only trained networks are sharded "
                         "(frozen ones stay whole on every rank, as the VAE and text encoder)")
    fully_shard(net, mesh=data_parallel_mesh(mesh), mp_policy=mixed_precision_policy(mixed_precision))
    return net


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a (possibly) FSDP2-sharded module, on CPU, on rank 0 (empty elsewhere).

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
