"""Review findings on lowrank.optim (PagedAdamW / AdamW8bit against torch.optim.AdamW)."""

import copy
import pickle

import pytest
import torch

from lowrank.optim import PagedAdamW


@pytest.mark.parametrize("state_bits", [32, 8])
def test_step_hooks_run_once_even_when_an_adamw_exists(state_bits):
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # wraps AdamW.step in the hooks (torch does, once)
    p = torch.nn.Parameter(torch.randn(512))
    opt = PagedAdamW([p], paged=False, state_bits=state_bits, min_8bit_size=256)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", p.grad is not None, p.detach().clone())))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", p.grad is not None, p.detach().clone())))
    before = p.detach().clone()
    p.grad = torch.ones(512)
    opt.step()
    assert [c[:2] for c in calls] == [("pre", True), ("post", True)]
    assert torch.equal(calls[0][2], before)  # the pre-hook runs before any parameter moves


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_the_settings_and_steps_as_the_original(how):
    p = torch.nn.Parameter(torch.randn(512))
    opt = PagedAdamW([p], lr=1e-2, paged=False, state_bits=8, min_8bit_size=256)
    p.grad = torch.randn(512)
    opt.step()
    p2, opt2 = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    assert (opt2.paged, opt2.state_bits, opt2.min_8bit_size) == (False, 8, 256)
    for q, o in ((p, opt), (p2, opt2)):
        q.grad = torch.ones(512)
        o.step()
    assert torch.equal(p, p2)
    assert torch.equal(opt.state[p]["state1"], opt2.state[p2]["state1"])
