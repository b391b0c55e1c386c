"""A module its model never calls (transformers' Mamba-style mixers pass `conv1d.weight` to a
causal-conv function; MambaMixer multiplies by `dt_proj.weight`): an adapter there never runs, so it
changes no output and gets no gradient, in PEFT too. With LoRA now taking grouped convolutions
(lowrank/tuners/lora_conv.py), `targets=["conv1d"]` on such a model injected a dead adapter in
silence; inject now warns, naming the modules (lowrank/targets.py, Note: modules their model never
calls), and still injects (a PEFT file with such a module still loads)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank
from lowrank import io as lio
from tests.tuners import models

transformers = pytest.importorskip("transformers")


def mamba():
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    return transformers.MambaModel(cfg).eval()


def test_lora_on_a_mamba_conv1d_warns_and_is_indeed_dead():
    model = mamba()
    with pytest.warns(UserWarning, match=r"LoRA on \['layers.0.mixer.conv1d', 'layers.1.mixer.conv1d'\] \(2 modules\) "
                                         r"would never run: .*\['MambaMixer.conv1d'\].*exclude them from targets"):
        assert lowrank.inject(model, lowrank.LoraConfig(r=32, targets=["conv1d"])) == [
            "layers.0.mixer.conv1d", "layers.1.mixer.conv1d"]
    models.randomize_adapters(model, std=1.0)
    ids = torch.randint(0, 32, (1, 6))
    out = model(ids).last_hidden_state
    with torch.no_grad(), lowrank.disabled(model):
        assert torch.equal(out, model(ids).last_hidden_state)  # what the warning says
    assert not out.requires_grad  # the adapters are all that trains, and the output does not depend on them


def test_dt_proj_warns_and_modules_that_are_called_do_not():
    with pytest.warns(UserWarning, match=r"\['MambaMixer.dt_proj'\]"):
        lowrank.inject(mamba(), lowrank.LoraConfig(r=4, targets=["dt_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.inject(mamba(), lowrank.LoraConfig(r=4, targets=["in_proj", "x_proj"]))  # the mixer calls both


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=2, groups=4)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):  # (N, 4, L)
        h = nn.functional.conv1d(x, self.conv.weight, self.conv.bias, padding=2, groups=4)[..., :x.shape[-1]]
        return self.proj(h.transpose(1, 2))


class CallsIt(ReadsWeight):
    def forward(self, x):
        return self.proj(self.conv(x)[..., :x.shape[-1]].transpose(1, 2))


def test_a_model_of_ones_own_is_told_apart_by_its_source():
    with pytest.warns(UserWarning, match=r"LoRA on \['0.conv'\] \(1 modules\) would never run.*\['ReadsWeight.conv'\]"):
        lowrank.inject(nn.Sequential(ReadsWeight()), lowrank.LoraConfig(r=4, targets=["conv", "proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowrank.inject(nn.Sequential(CallsIt()), lowrank.LoraConfig(r=4, targets=["conv", "proj"]))


def test_a_peft_file_with_such_a_module_still_loads(tmp_path):
    """PEFT 0.21 refuses conv1d on a few Mamba model types by name, and adapts it silently elsewhere."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(ReadsWeight())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: merging a grouped convolution is not supported
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["conv", "proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"would never run"):
        lio.load_adapter(ours, tmp_path / "peft")
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
