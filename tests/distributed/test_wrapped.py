"""The verbs on a model already inside DistributedDataParallel or fully_shard, 2 CPU ranks
(gloo): what adds parameters is refused (each rank would train its own copy), what writes
weights reshards first (an eval forward with reshard_after_forward=False left FSDP's temporary
copies in place, and merge wrote into them), what saves unwraps and gathers the float32 shards
(not DDP's `module.` names, not mixed precision's bf16 copies), and one rank writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowrank

from . import spawn, wrapped_cases
from .cases import WORLD


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("wrapped")
    spawn.run_ranks(wrapped_cases.worker, WORLD, str(out), (str(out),))
    results = [torch.load(out / f"wrapped{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, r in enumerate(results):
        for name, found in r.items():
            assert "error" not in found, f"rank {rank}, {name}:\n{found['error']}"
    return out, results


def test_ddp_refuses_inject_and_saves_under_the_models_own_names(ranks, tmp_path):
    out, results = ranks
    for r in results:
        assert r["ddp"]["inject"].startswith("RuntimeError: inject (and load_adapter) must run before "
                                             "DistributedDataParallel")
    single = wrapped_cases.adapted()
    lowrank.save_adapter(single, tmp_path / "adapter")
    lowrank.merge_and_export(single, tmp_path / "export")
    for kind in ("adapter", "export"):
        name = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
        got, want = load_file(out / f"ddp-{kind}" / name), load_file(tmp_path / kind / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "ddp-export" / "config.json").exists()
    assert json.loads((out / "ddp-adapter" / "adapter_config.json").read_text())["target_modules"] == \
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    # one rank wrote each directory (they raced: "Directory not empty" on one of them)
    assert results[0]["ddp"]["export"] == ["model.safetensors"] and results[1]["ddp"]["export"] is None
    assert results[0]["ddp"]["save_quantized"] and results[1]["ddp"]["save_quantized"] is None
    assert not any(k.startswith("module.") for k in load_file(out / "ddp-quantized" / "model.safetensors"))


def test_fsdp_after_an_eval_forward_refuses_new_parameters_and_merges_into_the_shards(ranks):
    _, results = ranks
    single = wrapped_cases.adapted()
    x = wrapped_cases.models.ids(batch=2, seq=8, seed=3)
    with torch.no_grad():
        single.eval()
        unmerged = single(input_ids=x).logits
        assert lowrank.merge(single)
        merged = single(input_ids=x).logits
    for r in results:
        found = r["fsdp"]
        assert "must run before fully_shard" in found["inject"] and "must run before fully_shard" in found["quantize"]
        assert "merge_and_export (a full model, gathered) must run before fully_shard" in found["export"]
        assert found["merged"] == lowrank.merge(wrapped_cases.adapted())  # the same layers
        before, after = found["logits"]
        # the same float32 arithmetic on each shard's rows as on the whole weight: equal to one process
        torch.testing.assert_close(before, unmerged, rtol=0, atol=0)
        torch.testing.assert_close(after, merged, rtol=0, atol=0)
        torch.testing.assert_close(found["logits_after_reshard"], merged, rtol=0, atol=0)


def test_fsdp_mixed_precision_saves_the_float32_adapter_after_an_eval_forward(ranks, tmp_path):
    out, _ = ranks
    lowrank.save_adapter(wrapped_cases.adapted(), tmp_path / "single")
    got = load_file(out / "fsdp-mixed-adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # not bf16-rounded
