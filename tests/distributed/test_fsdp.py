"""FSDP2 (fully_shard), 2 CPU ranks (gloo): sharded 4-bit bases, training equal to one
process, frozen weights frozen, saving gathers the adapter only, loading before sharding."""

import math

import pytest
import torch

from . import cases
from .checks import frozen_problems, not_as_one_process, same_adapter_directory
from .conftest import result

SAVABLE = [c for c in cases.FSDP_CONFIGS if cases.savable(cases.CONFIGS[c])]


def both(ranks, config, base):
    return [result(ranks, rank, cases.case_name("fsdp", config, base)) for rank in range(cases.WORLD)]


@pytest.mark.parametrize("base", cases.BASES)
@pytest.mark.parametrize("config", cases.FSDP_CONFIGS)
def test_fsdp_trains_as_one_process(ranks, reference, config, base):
    model = reference(config, base)
    for r in both(ranks, config, base):
        assert not_as_one_process(r, model) == []
        assert frozen_problems(r, model) == []
        assert r["summary"] == tuple(vars(cases.summary(model)).values())  # counts whole tensors, not shards


@pytest.mark.parametrize("config", cases.FSDP_CONFIGS)
def test_fsdp_shards_every_parameter_and_the_4bit_weights(ranks, config):
    rs = both(ranks, config, "nf4")
    shards = [r["shards"] for r in rs]
    assert all(kind == "DTensor" for s in shards for kind, _, _ in s.values())
    codec = [n for n in shards[0] if n.rsplit(".", 1)[-1] in cases.CODEC]
    assert {n.rsplit(".", 1)[-1] for n in codec} == set(cases.CODEC)
    for n in codec:
        numel = shards[0][n][1]
        local = [s[n][2] for s in shards]
        # fully_shard splits dim 0 as torch.chunk: ceil(numel / world) per rank, the last rank the rest
        assert sum(local) == numel and max(local) == math.ceil(numel / cases.WORLD), (n, numel, local)


def test_fsdp_mixed_precision_leaves_the_4bit_weights_alone(ranks):
    for rank in range(cases.WORLD):
        assert result(ranks, rank, "mixed-precision")["wrong"] == []


@pytest.mark.parametrize("config", cases.FSDP_CONFIGS)
def test_fsdp_inject_after_fully_shard_raises(ranks, config):
    for r in both(ranks, config, "plain"):
        assert "must run before fully_shard" in r["late_inject"]


@pytest.mark.parametrize("base", cases.BASES)
@pytest.mark.parametrize("config", SAVABLE)
def test_fsdp_save_gathers_the_adapter_and_rank0_writes(ranks, reference, config, base, tmp_path):
    rs = both(ranks, config, base)
    assert all(r["seen_after_save"] for r in rs)  # no rank returns before the files exist
    same_adapter_directory(rs[0]["saved"], reference(config, base), tmp_path)
    # only adapter tensors were gathered: one all-gather per tensor written, of its shape (a
    # prefix file holds one (P, L * 2 d_kv) table: the L per-layer (P, 2 d_kv) gathers, side by side)
    from safetensors.torch import load_file

    written = sorted(tuple(t.shape) for t in load_file(f"{rs[0]['saved']}/adapter_model.safetensors").values())
    for r in rs:
        if isinstance(cases.CONFIGS[config], cases.PrefixConfig):
            (P, width), = written
            assert {s[0] for s in r["gathered"]} == {P} and sum(s[1] for s in r["gathered"]) == width
        else:
            assert sorted(r["gathered"]) == written
    # rank 0's failure reaches every rank: its own error there, a RuntimeError naming it elsewhere
    assert rs[0]["failed_save"].startswith("NotADirectoryError")
    assert all(r["failed_save"].startswith("RuntimeError: rank 0 failed") and "NotADirectoryError" in r["failed_save"]
               for r in rs[1:])


@pytest.mark.parametrize("base", cases.BASES)
@pytest.mark.parametrize("config", SAVABLE)
def test_fsdp_load_then_shard_gives_each_rank_its_part(ranks, reference, config, base):
    model = reference(config, base)
    for rank, r in enumerate(both(ranks, config, base)):
        assert r["loaded_logits_equal"]  # the reloaded, resharded model computes as the trained one
        for n, p in model.named_parameters():
            if p.requires_grad:
                part = torch.chunk(p.detach(), cases.WORLD)  # (ceil(rows / world), ...) each
                want = part[rank] if rank < len(part) else p.new_empty((0, *p.shape[1:]))
                assert torch.equal(r["loaded_local"][n], want), n
