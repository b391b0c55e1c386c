"""get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)) of a QLoRA model:
the way to checkpoint only the adapters with torch.distributed.checkpoint. It raised KeyError
('...base.packed'): torch pops every frozen parameter's name from the state dict, and a 4-bit
layer's entries have bitsandbytes' names (Note: options torch matches by parameter names,
lowrank/quant/dsd.py). It now holds exactly the trainable parameters, as it does for the same
model on a frozen nn.Linear base, and set_model_state_dict(strict=False) loads them back: in one
process, and sharded by FSDP2 on 2 gloo ranks."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from tests.tuners import models

from . import dcp_4bit_worker as worker

if not torch.distributed.is_available():
    pytest.skip("this PyTorch is built without torch.distributed", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .spawn import run_ranks  # noqa: E402

ADAPTERS = StateDictOptions(ignore_frozen_params=True)
ADAPTERS_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # the base is not in it


def dense_lora(seed: int) -> torch.nn.Module:
    """worker.qlora's model on its full-precision base (no quantize)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    lowrank.inject(model, lowrank.LoraConfig(r=4, alpha=8))
    return model.eval()


def other_adapters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_the_adapters_alone_as_on_a_dense_base():
    saved = worker.qlora(0)
    sd = get_model_state_dict(saved, options=ADAPTERS)
    want = trainable(saved)
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
    dense = dense_lora(0)
    assert sd.keys() == get_model_state_dict(dense, options=ADAPTERS).keys()  # the same keys as on nn.Linear
    assert len(saved.state_dict()) > len(sd)  # and a plain state_dict() still holds the 4-bit base

    # loaded back, the base left as it is: the missing keys are those the dense model reports
    fresh = other_adapters(worker.qlora(0), 1)
    result = set_model_state_dict(fresh, sd, options=ADAPTERS_LOAD)
    dense_result = set_model_state_dict(other_adapters(dense, 1), sd, options=ADAPTERS_LOAD)
    assert result.missing_keys == dense_result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(worker.logits(fresh), worker.logits(saved), rtol=0, atol=0)


def test_4bit_experts_are_left_out_too():
    model = models.mixtral()
    lowrank.quantize(model, lowrank.NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))
    lowrank.inject(model, lowrank.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    sd = get_model_state_dict(model, options=ADAPTERS)
    assert sd.keys() == trainable(model).keys()


def _sharded_adapters(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))

    def sharded(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    saved = sharded(worker.qlora(0))
    want = worker.logits(saved)
    sd = get_model_state_dict(saved, options=ADAPTERS)
    assert sd.keys() == trainable(saved).keys() and all(isinstance(t, DTensor) for t in sd.values())
    dcp.save(sd, checkpoint_id=f"{out}/adapters")
    full = get_model_state_dict(saved, options=StateDictOptions(ignore_frozen_params=True, full_state_dict=True))
    one = trainable(worker.qlora(0))  # gathered: the one-process model's adapters
    assert full.keys() == one.keys() and all(torch.equal(full[k], one[k]) for k in full)

    fresh = sharded(other_adapters(worker.qlora(0), 1))
    sd = get_model_state_dict(fresh, options=ADAPTERS)
    dcp.load(sd, checkpoint_id=f"{out}/adapters")
    result = set_model_state_dict(fresh, sd, options=ADAPTERS_LOAD)
    assert not result.unexpected_keys and all(".lora_" not in k for k in result.missing_keys)
    got = worker.logits(fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.save({"keys": len(sd), "max_diff": (got - want).abs().max().item()}, f"{out}/rank{rank}.pt")


def test_the_adapters_alone_of_a_sharded_model_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_ranks(_sharded_adapters, 2, str(tmp_path), (str(tmp_path),))  # a rank's failed check fails the test
    checked = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(c["keys"] == 28 and c["max_diff"] == 0.0 for c in checked), checked
