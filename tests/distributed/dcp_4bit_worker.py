"""What each rank runs for test_dcp_4bit.py, under `torchrun --standalone --nproc_per_node 2 -m
tests.distributed.dcp_4bit_worker OUT`: a QLoRA model sharded by FSDP2 (one group per decoder
layer, then the root) is saved with torch.distributed.checkpoint and loaded into fresh sharded
models built from other weights, through get/set_model_state_dict and through the plain
state_dict / load_state_dict, and its gathered (full) state dict loaded into another; each rank writes the logits every model gives to OUT/rank{r}.pt."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import lowrank

IDS = torch.arange(12).view(2, 6)  # (batch, T) token ids


def qlora(seed: int, modules=None) -> torch.nn.Module:
    """A tiny Llama in 4 bits with LoRA on every linear layer, its B not zero; `seed` sets every weight."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    lowrank.quantize(model, lowrank.NF4Config())
    lowrank.inject(model, lowrank.LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not the identity: the adapters take part in the comparison
            torch.nn.init.normal_(p)
    return model.eval()


def experts4bit(seed: int) -> torch.nn.Module:
    """A tiny Mixtral whose experts are 4-bit parameters (Weight4bit); `seed` sets every weight."""
    from tests.tuners import models

    model = models.mixtral()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    lowrank.quantize(model, lowrank.NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return model.eval()


def load_sharded(checkpoint_id, mesh, planner) -> torch.nn.Module:
    """qlora(1) sharded by FSDP2 on `mesh` (one group per decoder layer, then the root), the DCP
    checkpoint at `checkpoint_id` loaded into it with `planner` through get/set_model_state_dict,
    which must find every key."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = qlora(1)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sd = get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=checkpoint_id, planner=planner)
    result = set_model_state_dict(model, sd)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def main(out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sharded(seed: int) -> torch.nn.Module:
        model = qlora(seed)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    saved = sharded(0)
    found = {"saved": logits(saved)}
    dcp.save(get_model_state_dict(saved), checkpoint_id=os.path.join(out, "dsd"))
    dcp.save(saved.state_dict(), checkpoint_id=os.path.join(out, "plain"))

    fresh = sharded(1)  # other weights: other double-quantization offsets (Note: the quant state's length)
    sd = get_model_state_dict(fresh)
    dcp.load(sd, checkpoint_id=os.path.join(out, "dsd"))
    result = set_model_state_dict(fresh, sd)
    found["dsd"], found["dsd_keys"] = logits(fresh), result.missing_keys + result.unexpected_keys

    fresh = sharded(2)
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=os.path.join(out, "plain"))
    result = fresh.load_state_dict(sd)
    found["plain"], found["plain_keys"] = logits(fresh), result.missing_keys + result.unexpected_keys

    # whole tensors, each rank all of them (test_full_state_dict_4bit.py): each rank keeps its part
    full = StateDictOptions(full_state_dict=True)
    fresh = sharded(3)
    result = set_model_state_dict(fresh, get_model_state_dict(saved, options=full), options=full)
    found["full"], found["full_keys"] = logits(fresh), result.missing_keys + result.unexpected_keys
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # every rank done before the group goes (an early exit can abort a peer's gloo thread)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
