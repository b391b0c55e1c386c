"""PagedAdamW: AdamW's updates, bit for bit; on CUDA its moments live in managed memory."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import nf4
from lowrank.optim import AdamW8bit, PagedAdamW


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


# -- state_bits=8 (lowrank/optim.py, Note: 8-bit states) -------------------------------------------


def _train_8bit(opt_cls, dtype, steps=5, device="cpu", **kw):
    """Tensors with independent losses, so each one's trajectory depends on its own update only:
    `big` (8192 elements, 32 blocks of 256), `wide` (12288, 48 blocks), `odd` (4099: a short last
    block) and `small` (100, below AdamW8bit's default min_8bit_size). Returns them, the optimizer."""
    g = torch.Generator().manual_seed(2)
    shapes = [(64, 128), (96, 128), (4099,), (100,)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(device, dtype)) for shape in shapes]
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, **kw)
    for _ in range(steps):
        targets = [torch.randn(shape, generator=g).to(device, dtype) for shape in shapes[:3]]
        loss = sum((p - t).square().mean() for p, t in zip(params, targets)) + params[3].square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [True, False])
def test_8bit_updates_equal_bitsandbytes_adamw8bit(paged, dtype, foreach):
    """The 8-bit parameters: values, codes and scales equal bitsandbytes' AdamW8bit's bit for bit
    after 5 steps, one at a time or (foreach) big and wide as one flat tensor; the small one:
    torch.optim.AdamW's, as AdamW8bit keeps small tensors in float32."""
    bnb = pytest.importorskip("bitsandbytes")
    ours, opt = _train_8bit(PagedAdamW, dtype, state_bits=8, paged=paged, foreach=foreach)
    theirs, opt_bnb = _train_8bit(bnb.optim.AdamW8bit, dtype)
    ref, _ = _train_8bit(torch.optim.AdamW, dtype)
    if foreach:
        assert [len(b) for b in opt._batches(opt.param_groups[0], ours[:3])] == [2, 1]  # big + wide together, odd alone
    for p, q in zip(ours[:3], theirs[:3]):
        assert torch.equal(p, q)
        a, b = opt.state[p], opt_bnb.state[q]
        assert int(a["step"]) == b["step"] == 5
        for i in (1, 2):
            assert a[f"state{i}"].dtype == torch.uint8 and torch.equal(a[f"state{i}"], b[f"state{i}"])
            assert torch.equal(a[f"absmax{i}"].view(torch.float32), b[f"absmax{i}"])
    assert torch.equal(ours[3], ref[3])
    assert set(opt.state[ours[3]]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's float32 moments


@given(n=st.integers(1, 3000), lr=st.sampled_from([1e-4, 1e-2, 0.5]), betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
       eps=st.sampled_from([1e-8, 1e-3]), wd=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 3),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_8bit_equals_adamw8bit_for_any_size_and_hyperparameters(n, lr, betas, eps, wd, steps, bf16, seed):
    """One tensor of any size (short last blocks, blocks of zeros when the gradient is sparse),
    AdamW8bit's hyperparameters drawn: the same values and codes as bitsandbytes', bit for bit."""
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    start = torch.randn(n, generator=g).to(dtype)
    grads = [(torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.5)).to(dtype) for _ in range(steps)]
    results = []
    for make in (lambda ps: AdamW8bit(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd, min_8bit_size=0),
                 lambda ps: bnb.optim.AdamW8bit(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd, min_8bit_size=0)):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        results.append((p.detach(), opt.state[p]))
    (ours, a), (theirs, b) = results
    assert torch.equal(ours, theirs)
    for i in (1, 2):
        assert torch.equal(a[f"state{i}"], b[f"state{i}"]) and torch.equal(a[f"absmax{i}"].view(torch.float32),
                                                                          b[f"absmax{i}"])


def test_adamw8bit_is_paged_adamw_with_8bit_states():
    ours, opt = _train_8bit(AdamW8bit, torch.bfloat16)
    same, _ = _train_8bit(PagedAdamW, torch.bfloat16, state_bits=8, paged=False)
    assert opt.state_bits == 8 and not opt.paged and all(torch.equal(p, q) for p, q in zip(ours, same))
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8


def test_8bit_batches_are_capped(monkeypatch):
    """foreach batches stop at BATCH_ELEMENTS (their float32 temporaries grow with them); a larger
    parameter still makes a batch of its own."""
    from lowrank import optim

    params, opt = _train_8bit(PagedAdamW, torch.float32, steps=1, state_bits=8, paged=False, foreach=True)
    monkeypatch.setattr(optim, "BATCH_ELEMENTS", 20480)
    assert [[p.numel() for p in b] for b in opt._batches(opt.param_groups[0], params[:3] * 2)] == [[8192, 12288], [4099], [8192, 12288], [4099]]
    monkeypatch.setattr(optim, "BATCH_ELEMENTS", 10000)
    assert [len(b) for b in opt._batches(opt.param_groups[0], params[:3])] == [1, 1, 1]


def test_8bit_states_take_a_quarter_of_the_memory():
    (big, *_), opt = _train_8bit(PagedAdamW, torch.float32, steps=1, state_bits=8, paged=False)
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[big].items() if k != "step")
    assert nbytes == 2 * big.numel() + 2 * 4 * (big.numel() // 256)  # 2 codes + 2 float32 scales a block of 256
    assert nbytes * 3.9 < 8 * big.numel()  # AdamW's two float32 moments


def test_8bit_state_dict_round_trip_continues_the_same():
    """Save after 3 steps, load into a fresh optimizer over copies of the parameters, run 2 more
    steps on both: equal bit for bit. bfloat16 parameters: the scales must not be cast to them
    (torch's load_state_dict casts floating states to the parameter's dtype), and the loaded
    state dict itself stays unchanged."""
    params, opt = _train_8bit(PagedAdamW, torch.bfloat16, steps=3, state_bits=8, paged=False)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = PagedAdamW(copies, lr=1e-2, weight_decay=0.1, state_bits=8, paged=False)
    saved = copy.deepcopy(opt.state_dict())  # its own tensors: opt's state_dict() shares opt's
    before = {k: v.clone() for k, v in saved["state"][0].items()}
    fresh.load_state_dict(saved)
    assert fresh.state[copies[0]]["absmax1"].dtype == torch.int32
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        targets = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params[:3]]
        for ps, o in ((params, opt), (copies, fresh)):
            (sum((p - t).square().mean() for p, t in zip(ps, targets)) + ps[3].square().sum()).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    assert all(torch.equal(before[k], saved["state"][0][k]) for k in before)


def test_state_dicts_load_across_state_bits():
    """AdamW's float32 moments loaded into AdamW8bit are coded to 8 bits (what its step would store),
    and 8-bit ones loaded into AdamW are decoded; both optimizers then step on."""
    params, opt32 = _train_8bit(PagedAdamW, torch.float32, steps=2, paged=False)
    opt8 = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    opt8.load_state_dict(opt32.state_dict())
    for p in params[:3]:
        codes, absmax = nf4.quantize_8bit(opt32.state[p]["exp_avg_sq"].reshape(-1), 256, signed=False)
        assert set(opt8.state[p]) == {"step", "state1", "state2", "absmax1", "absmax2"}
        assert torch.equal(opt8.state[p]["state2"].reshape(-1), codes)
        assert torch.equal(opt8.state[p]["absmax2"].view(torch.float32), absmax)
    assert torch.equal(opt8.state[params[3]]["exp_avg"], opt32.state[params[3]]["exp_avg"])  # small: float32 still
    back = PagedAdamW(params, lr=1e-2, weight_decay=0.1, paged=False)
    back.load_state_dict(opt8.state_dict())
    for p in params[:3]:
        m = nf4.dequantize_8bit(opt8.state[p]["state1"].reshape(-1), opt8.state[p]["absmax1"].view(torch.float32))
        assert set(back.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and torch.equal(back.state[p]["exp_avg"].reshape(-1), m)
    for o in (opt8, back):
        sum(p.square().sum() for p in params).backward()
        o.step()
        o.zero_grad()


def test_8bit_arguments_are_checked():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"state_bits must be 32 .* or 8 .*; got 16"):
        PagedAdamW(p, state_bits=16)
    with pytest.raises(ValueError, match="amsgrad=True needs float32 states"):
        PagedAdamW(p, amsgrad=True, state_bits=8)
    with pytest.raises(ValueError, match="min_8bit_size must be an int >= 0 .*; got -1"):
        PagedAdamW(p, state_bits=8, min_8bit_size=-1)
    with pytest.raises(TypeError, match="foreach must be None .*, True or False; got 'yes'"):
        PagedAdamW(p, foreach="yes")
    sharded = torch.nn.Parameter(torch.zeros(8192))
    sharded.to_local = lambda: sharded  # what marks an FSDP2 DTensor here
    sharded.grad = torch.ones(8192)
    with pytest.raises(ValueError, match=r"state_bits=8 does not take FSDP2-sharded \(DTensor\) parameters"):
        AdamW8bit([sharded]).step()


@pytest.mark.parametrize("foreach", [False, True])
def test_8bit_maximize_ascends_as_adamw_does(foreach):
    # AdamW's maximize steps with -grad: the 8-bit update of g with maximize is the one of -g, bit for bit
    torch.manual_seed(0)
    grads = [torch.randn(3, 4096) for _ in range(4)]
    up, down = (torch.nn.Parameter(torch.randn(3, 4096)) for _ in range(2))
    with torch.no_grad():
        down.copy_(up)
    small = torch.nn.Parameter(torch.ones(8))  # below min_8bit_size: AdamW's own maximize
    opt_up = AdamW8bit([{"params": [up, small], "maximize": True}], lr=1e-2, foreach=foreach)
    opt_down = AdamW8bit([down], lr=1e-2, foreach=foreach)
    for g in grads:
        up.grad, down.grad, small.grad = g.clone(), -g, torch.ones(8)
        opt_up.step()
        opt_down.step()
        assert torch.equal(up.grad, g)  # the gradient is not negated in place
    assert torch.equal(up, down) and (small > 1).all()


def test_8bit_refuses_before_any_parameter_moves():
    big = torch.nn.Parameter(torch.zeros(4096))
    for bad, error, match in [({"amsgrad": True}, ValueError, "param group 1 has amsgrad=True, which needs float32"),
                              ({"sparse": True}, RuntimeError, "AdamW does not support sparse gradients"),
                              ({"complex": True}, TypeError, "state_bits=8 takes real floating parameters; param group "
                                                             r"1 has a torch.complex64 one of shape \(4096,\)")]:
        odd = torch.nn.Parameter(torch.zeros(4096, dtype=torch.complex64 if "complex" in bad else torch.float32))
        opt = AdamW8bit([{"params": [big]}, {"params": [odd], "amsgrad": "amsgrad" in bad}], lr=0.1)
        big.grad = torch.ones(4096)
        odd.grad = torch.ones(4096).to_sparse() if "sparse" in bad else torch.ones_like(odd)
        with pytest.raises(error, match=match):
            opt.step()
        assert not big.any() and not opt.state  # nothing moved, no step counted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_8bit_states_are_managed_and_the_first_step_is_the_cpus():
    """The codes and scales of a paged CUDA parameter live in the managed pool. One step from zero
    states (no 8-bit rounding enters it yet) matches the CPU's within the rounding of its
    elementwise ops: the update is lr * u with |u| <= 1 computed to a few float32 ulps, so
    |difference| <= 8 eps lr + 2 ulp(p)."""
    from lowrank import optim

    (big, *_), opt = _train_8bit(PagedAdamW, torch.float32, steps=1, device="cuda", state_bits=8)
    (big_cpu, *_), _ = _train_8bit(PagedAdamW, torch.float32, steps=1, state_bits=8, paged=False)
    segments = optim._POOLS[torch.cuda.current_device()].snapshot()
    for name in ("state1", "state2", "absmax1", "absmax2"):
        ptr = opt.state[big][name].data_ptr()
        assert any(s["address"] <= ptr < s["address"] + s["total_size"] for s in segments), name
    eps = torch.finfo(torch.float32).eps
    ulp = torch.nextafter(big_cpu.abs(), torch.tensor(float("inf"))) - big_cpu.abs()
    assert ((big.cpu() - big_cpu).abs() <= 8 * eps * 1e-2 + 2 * ulp).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_8bit_step_never_waits_for_the_gpu(paged):
    """The 8-bit update (batched, CUDA's default) and AdamW's for the small tensor make no
    host-device synchronization torch can see (set_sync_debug_mode raises on one)."""
    params, opt = _train_8bit(PagedAdamW, torch.float32, steps=1, device="cuda", state_bits=8, paged=paged)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(opt.state[params[0]]["step"]) == 2


def _stepped(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def test_a_refused_state_dict_leaves_the_optimizer_as_it_was():
    """An amsgrad state dict was refused only after AdamW's load had replaced the state and set
    amsgrad=True (every later step raised); an 8-bit state of the wrong shape was taken and the
    next step failed deep inside. Both are refused, and the optimizer steps on as before."""
    _, amsgrad = _stepped(PagedAdamW, paged=False, amsgrad=True)
    _, other = _stepped(AdamW8bit, seed=1)
    bad_shape = other.state_dict()
    bad_shape["state"][0]["state1"] = bad_shape["state"][0]["state1"][:10]
    for state_dict, match in [(amsgrad.state_dict(), "amsgrad=True optimizer cannot be loaded with state_bits=8"),
                              (bad_shape, r"state1 of parameter 0 is torch.uint8 \(10, 80\); a parameter of shape "
                                          r"\(64, 80\) keeps torch.uint8 \(64, 80\)")]:
        params, opt = _stepped(AdamW8bit)
        twin_params, twin = _stepped(AdamW8bit)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(state_dict)
        for p in params + twin_params:
            p.grad = torch.ones_like(p)
        opt.step()
        twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_8bit_step_with_a_nan_gradient_goes_on_as_adamw_does():
    """AdamW turns a NaN gradient into NaN weights without an error; the 8-bit step raised an
    IndexError half way (its 8-bit code of a NaN was out of the table) after moving some weights."""
    params, opt = _stepped(AdamW8bit)
    small = params[1].detach().clone()
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[3, 7] = float("nan")
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert params[0][3, 7].isnan() and not torch.equal(params[1].detach(), small)
    codes, absmax = nf4.quantize_8bit(torch.tensor([1.0, float("nan"), float("inf")] + [0.5] * 253 + [2.0]), 256)
    assert absmax[0].isnan() and absmax[1] == 2.0 and int(codes.max()) <= 255
