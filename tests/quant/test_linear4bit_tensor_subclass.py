"""Loading a 4-bit state dict where the layer's storage, or the checkpoint's tensors, are a tensor
subclass other than DTensor (a user's, torchao's): a whole tensor, copied in place (or assigned)
as a plain one is. Only a DTensor is FSDP2's shard; any other subclass was taken for one and the
load raised AttributeError ('... has no attribute to_local' / 'device_mesh')."""

import pytest
import torch
from torch import nn

from lowrank.quant.linear4bit import Linear4bit

FIELDS = ("packed", "absmax", "nested_absmax")


class Tagged(torch.Tensor):
    """A tensor subclass that is not a DTensor: torch.Tensor's own __torch_function__, results stay Tagged."""


def pair() -> tuple[Linear4bit, Linear4bit]:
    """Two 4-bit layers of the same layout (double quantization: all three fields) and other values."""
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(128, 16)), Linear4bit.from_linear(nn.Linear(128, 16))


def tag_storage(layer: Linear4bit) -> None:
    for f in FIELDS:
        layer._parameters[f] = nn.Parameter(layer._parameters[f].data.as_subclass(Tagged), requires_grad=False)


def same_weight(a: Linear4bit, b: Linear4bit) -> None:
    for f in FIELDS + ("offset",):
        assert torch.equal(torch.as_tensor(getattr(a, f)).as_subclass(torch.Tensor), getattr(b, f)), f
    assert torch.equal(a.dequantize(), b.dequantize())  # the same codes: the same weight, exactly


def test_a_subclass_storage_is_copied_into_in_place():
    layer, other = pair()
    tag_storage(layer)
    held = {f: layer._parameters[f] for f in FIELDS}
    result = layer.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    same_weight(layer, other)
    assert all(layer._parameters[f] is held[f] for f in FIELDS)  # written into, as torch's param.copy_
    assert type(layer.packed) is Tagged


def test_a_subclass_storage_takes_the_checkpoints_tensors_with_assign():
    layer, other = pair()
    tag_storage(layer)
    layer.load_state_dict(other.state_dict(), assign=True)
    same_weight(layer, other)


def test_subclass_checkpoint_tensors_into_dtensor_shards(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("PyTorch built without torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        layer, other = pair()
        for f in FIELDS:  # as fully_shard leaves them: DTensor parameters sharded along dim 0
            layer._parameters[f] = nn.Parameter(DTensor.from_local(layer._parameters[f].data, mesh, [Shard(0)]),
                                                requires_grad=False)
        storage = {f: layer._parameters[f].to_local().data_ptr() for f in FIELDS}
        tagged = {k: v.as_subclass(Tagged) for k, v in other.state_dict().items()}
        layer.load_state_dict(tagged)
        for f in FIELDS:
            assert isinstance(layer._parameters[f], DTensor)
            assert layer._parameters[f].to_local().data_ptr() == storage[f]  # into the shard's own storage
            assert torch.equal(layer._parameters[f].full_tensor(), getattr(other, f)), f
    finally:
        dist.destroy_process_group()
