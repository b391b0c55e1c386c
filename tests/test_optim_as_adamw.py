"""PagedAdamW behaves as torch.optim.AdamW where a user leans on it: step hooks, copies, maximize,
loaded state dicts of other shapes, paged states of strided parameters, sharded 8-bit refusals."""

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


def test_8bit_refuses_a_sharded_parameter_before_any_parameter_moves(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain = torch.nn.Parameter(torch.randn(512))  # e.g. the root's, when only the layers are fully_shard-ed
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(512), mesh, [Shard(0)]))
        opt = PagedAdamW([plain, sharded], paged=False, state_bits=8, min_8bit_size=256)
        before = plain.detach().clone()
        plain.grad, sharded.grad = torch.ones(512), distribute_tensor(torch.ones(512), mesh, [Shard(0)])
        with pytest.raises(ValueError, match="DTensor"):
            opt.step()
        assert torch.equal(plain, before) and not opt.state[plain]
    finally:
        dist.destroy_process_group()


def test_paged_states_of_a_channels_last_parameter_are_prefetched(monkeypatch):
    """The CUDA path, simulated on the CPU: managed_prefetch (csrc/bindings_cuda.cpp) refuses a
    non-contiguous tensor, and AdamW's states of a channels_last (or transposed) parameter keep its
    strides; each must be prefetched whole, as the flat view of its bytes."""
    import contextlib

    import lowrank.optim as O

    seen = []

    class Ext:
        @staticmethod
        def managed_prefetch(t):
            if not t.is_contiguous():  # managed_prefetch_op's TORCH_CHECK
                raise RuntimeError(f"managed_prefetch takes a contiguous tensor, got strides {t.stride()}")
            seen.append((t.data_ptr(), t.nbytes))

    monkeypatch.setattr(O, "_extension", lambda: Ext)
    monkeypatch.setattr(O, "managed_pool", lambda device: None)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", lambda pool, device=None: contextlib.nullcontext())
    p = torch.nn.Parameter(torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last))
    p.grad = torch.randn_like(p)
    opt = PagedAdamW([p], foreach=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    opt.step()
    monkeypatch.undo()
    moments = [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")]
    assert seen == [(t.data_ptr(), t.numel() * t.element_size()) for t in moments]


def test_paged_without_a_cuda_extension_says_what_to_do(monkeypatch):
    """A CUDA parameter (simulated) and a lowrank._C without CUDA: the error names the way out
    (paged=False, or a CUDA build), as managed_pool's does, not a bare ImportError."""
    import lowrank.optim as O

    def no_cuda():
        raise ImportError("lowrank._C was built without CUDA")

    monkeypatch.setattr(O, "_extension", no_cuda)
    monkeypatch.setattr(O, "_POOLS", {})
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.ones(4)
    opt = PagedAdamW([p], foreach=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(RuntimeError, match="paged=False"):
        opt.step()


@pytest.mark.parametrize("state_bits", [32, 8])
def test_maximize_is_an_argument_as_in_adamw(state_bits):
    """"the arguments are AdamW's": maximize=True as AdamW(maximize=True) takes it, not only in a param group."""
    g = torch.Generator().manual_seed(0)
    p, q = (torch.nn.Parameter(torch.randn(512, generator=g)) for _ in range(2))
    with torch.no_grad():
        q.copy_(p)
    a = PagedAdamW([p], paged=False, state_bits=state_bits, min_8bit_size=256, maximize=True)
    b = PagedAdamW([{"params": [q], "maximize": True}], paged=False, state_bits=state_bits, min_8bit_size=256)
    for _ in range(2):
        grad = torch.randn(512, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    assert a.param_groups[0]["maximize"] and torch.equal(p, q)


@pytest.mark.parametrize("shape", [(20, 20), (15, 20)])
def test_a_float32_state_of_another_shape_is_refused_by_8bit_states(shape):
    """A 32-bit state dict coded to 8 bits on load: a moment of another shape than its parameter (another
    model's state dict) is refused with the shapes (it was a bare view error, or silently reshaped)."""
    a = torch.nn.Parameter(torch.randn(300))
    a.grad = torch.ones(300)
    opt = PagedAdamW([a], paged=False)
    opt.step()
    b = torch.nn.Parameter(torch.randn(shape))
    opt8 = PagedAdamW([b], paged=False, state_bits=8, min_8bit_size=256)
    with pytest.raises(ValueError, match=r"shape \(300,\).*shape \(" + str(shape[0])):
        opt8.load_state_dict(opt.state_dict())
    assert not opt8.state


@pytest.mark.parametrize("state_bits", [32, 8])
def test_a_loaded_state_dict_has_the_entries_adamw_loads(state_bits):
    """After load_state_dict, the state holds the loaded parameters' entries only, as AdamW's does
    (it had an empty {} for every parameter without state)."""
    a, b = torch.nn.Parameter(torch.randn(512)), torch.nn.Parameter(torch.randn(512))
    a.grad = torch.ones(512)
    ref = torch.optim.AdamW([a, b])
    ref.step()
    opt = PagedAdamW([a, b], paged=False, state_bits=state_bits, min_8bit_size=256)
    opt.load_state_dict(ref.state_dict())
    assert list(opt.state_dict()["state"]) == [0] and b not in opt.state


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="managed memory needs CUDA")
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_paged_optimizer_on_cuda_steps_as_the_original(how):
    # a deepcopy's / an unpickled copy's states are made by the default CUDA allocator, not in managed
    # memory, and managed_prefetch (cudaMemPrefetchAsync) takes managed memory only: its first step failed
    import copy
    import pickle

    import torch

    from lowrank.optim import PagedAdamW

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = PagedAdamW([p], lr=1e-2, paged=True)
    p.grad = torch.randn_like(p)
    opt.step()
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = other.param_groups[0]["params"][0]
    p.grad = q.grad = torch.ones_like(p)
    opt.step()
    other.step()
    assert torch.equal(p, q)
