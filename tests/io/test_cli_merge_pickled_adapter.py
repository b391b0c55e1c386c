"""`lowrank merge BASE ADAPTER OUT` for an adapter whose weights are only a pickled
adapter_model.bin (older PEFT): load_adapter reads it only with allow_pickle=True, which the
command had no way to pass, so such an adapter could not be merged at all. --allow-pickle passes
it; without it the command refuses, one line, naming the file. The merged weights are those
merge_and_export writes for the same adapter loaded by hand, tensor for tensor."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank.cli import main  # noqa: E402
from tests.io.export_helpers import saved_base  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_allow_pickle_merges_an_old_peft_adapter(tmp_path, capsys):
    base = saved_base("llama", tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowrank merge: error:") and "adapter_model.bin is a pickle file" in err[-1]
    assert not (tmp_path / "out").exists()

    assert main(args + ["--allow-pickle"]) == 0
    assert "merged 4 modules" in capsys.readouterr().out
    expected = copy.deepcopy(base)
    lowrank.load_adapter(expected, tmp_path / "adapter", allow_pickle=True, dtype=torch.float32)  # as the command
    lowrank.merge_and_export(expected, tmp_path / "expected")
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    want = safetensors_torch.load_file(tmp_path / "expected" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base.model.layers[0].self_attn.q_proj.weight)
