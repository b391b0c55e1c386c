"""PagedAdamW: AdamW's updates, bit for bit; on CUDA its moments live in managed memory."""

import pytest
import torch

from lowrank.optim import PagedAdamW


def _train(opt_cls, device, steps=5, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g).to(device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("paged", [True, False])
def test_cpu_updates_equal_adamw(paged, amsgrad):
    ours, opt = _train(PagedAdamW, "cpu", paged=paged, amsgrad=amsgrad)
    ref, ref_opt = _train(torch.optim.AdamW, "cpu", amsgrad=amsgrad)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # the same code on the same tensors
    for (sa, sb) in zip(opt.state.values(), ref_opt.state.values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_round_trip_continues_as_adamw():
    ours, opt = _train(PagedAdamW, "cpu", steps=3)
    fresh = PagedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert all(torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in ours.parameters())
    with pytest.raises(TypeError, match="paged must be a bool; got 'yes'"):
        PagedAdamW(ours.parameters(), paged="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_updates_equal_adamw_and_moments_are_managed(amsgrad):
    from lowrank import optim

    ours, opt = _train(PagedAdamW, "cuda", amsgrad=amsgrad)
    ref, ref_opt = _train(torch.optim.AdamW, "cuda", amsgrad=amsgrad)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    segments = optim._POOLS[torch.cuda.current_device()].snapshot()  # what our managed allocator handed out
    assert segments
    for state in opt.state.values():
        assert state["step"].device.type == "cpu"  # as AdamW keeps it
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            ptr = state[name].data_ptr()
            assert any(s["address"] <= ptr < s["address"] + s["total_size"] for s in segments), name
    # a state dict loaded into a fresh PagedAdamW lands in managed memory again
    fresh = PagedAdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    fresh.load_state_dict(opt.state_dict())
    for p in ours.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
