"""set_model_state_dict(..., options=StateDictOptions(full_state_dict=True)) into a QLoRA model
sharded by FSDP2, from a 4-bit checkpoint quantized otherwise than the model. In one process a
4-bit layer takes the checkpoint's dtype, blocksize and double quantization; sharded, it put new
plain tensors in place of FSDP2's parameters and FSDP2's own hook failed on them ("'Parameter'
object has no attribute '_local_tensor'"). A checkpoint quantized from bf16 has the tensors of
one quantized from float32 (the dtype is only what the codes decode to): it now loads into the
shards, as in one process. Other sizes (blocksize, double quantization) cannot be taken by FSDP2
after fully_shard: a load error that names both layouts and what to do."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import dcp_4bit_worker as worker
from .test_full_state_dict_4bit import FULL, one_rank

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

from torch.distributed.checkpoint.state_dict import set_model_state_dict  # noqa: E402


def checkpoint(dtype: torch.dtype = torch.float32, **nf4) -> dict[str, torch.Tensor]:
    """The state dict of worker.qlora(0)'s model quantized from `dtype` with NF4Config(**nf4)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).to(dtype)
    lowrank.quantize(model, lowrank.NF4Config(**nf4))
    lowrank.inject(model, lowrank.LoraConfig(r=4, alpha=8))
    return model.float().state_dict()  # the 4-bit layers keep the dtype they were quantized from


def sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    model = worker.qlora(1)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def test_a_checkpoint_quantized_from_bf16_loads_into_the_shards(tmp_path):
    sd = checkpoint(torch.bfloat16)
    one = worker.qlora(1)  # the same load in one process: the reference
    result = one.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    with one_rank(tmp_path) as mesh:
        fresh = sharded(mesh)
        layer = fresh.model.layers[0].self_attn.q_proj.base
        packed = layer.packed
        result = set_model_state_dict(fresh, sd, options=FULL)
        assert not result.missing_keys and not result.unexpected_keys
        assert layer.packed is packed and layer.dtype == torch.bfloat16  # the shards, now bf16 codes
        torch.testing.assert_close(worker.logits(fresh), worker.logits(one), rtol=0, atol=0)


@pytest.mark.parametrize("nf4", [{"blocksize": 128}, {"double_quant": False}])
def test_other_sizes_are_a_load_error_that_says_what_to_do(tmp_path, nf4):
    sd = checkpoint(**nf4)
    with one_rank(tmp_path) as mesh:
        fresh = sharded(mesh)
        with pytest.raises(RuntimeError) as e:
            set_model_state_dict(fresh, sd, options=FULL)
    msg = str(e.value)
    assert "'model.layers.0.self_attn.q_proj.base.weight'" in msg
    have = f"blocksize {nf4.get('blocksize', 64)}, double_quant={nf4.get('double_quant', True)}"
    assert f"the checkpoint stores it with {have}, this layer, sharded by FSDP2, with blocksize 64, double_quant=True" in msg
    assert "before fully_shard" in msg and "_local_tensor" not in msg
