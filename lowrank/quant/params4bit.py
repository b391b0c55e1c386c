"""4-bit parameters: NF4 for weights that no linear layer holds, above all the experts of a
transformers 5 mixture-of-experts layer (one 3-D tensor (experts, out, in) that the experts
module indexes itself), which hold most of such a model's weights.

    lowrank.quantize(model, NF4Config(parameters=["experts.gate_up_proj", "experts.down_proj"]))

# Note: a 4-bit parameter. The module that owns the parameter (the "owner") keeps its class
# and its place in the model. The parameter becomes a Weight4bit submodule under the
# parameter's own name: the NF4 codes and scales as frozen integer parameters, as a Linear4bit
# keeps them (Note: frozen integer parameters, linear4bit.py), so `.to`, DDP and FSDP2 see
# ordinary tensors, and the state dict holds bitsandbytes' entries at the parameter's key
# (`experts.gate_up_proj`, `experts.gate_up_proj.absmax`, ...). The owner's forward is
# replaced, on the instance. A transformers 5 experts module then computes each routed expert
# from its codes (experts4bit.py, Note: routed experts). Any other owner takes the dense path:
# each 4-bit parameter is dequantized (in the dtype of its inputs: Note: the dtype of a 4-bit
# parameter) into the owner's instance dict (which attribute lookup reads before nn.Module's
# submodules, so `self.gate_up_proj` in the owner's code is the dense tensor), the class's
# forward is called, and the dense tensors are taken away again. Every experts implementation
# (eager, grouped_mm, batched_mm) then runs as it always does.
#
# LoRA on the parameter (LoraParameter, lowrank/tuners/lora_param.py) hands the owner its
# update (`with_term`, a context variable for the call): added to each routed expert's
# product, or formed into W' = dequant(W) + s B A on the dense path.
#
# The dense path is not thread-safe: two threads calling one owner at once share its instance
# dict (as LoRA's functional_call on a dense parameter shares the module's attributes). The
# routed path keeps nothing on the module, and LoRA's updates are per thread.
#
# Memory: the dense path's tensor lives for one call of the owner, and, under autograd, as long
# as the experts' backward needs it (the eager implementation keeps each expert's slice for the
# input's gradient). Train with activation checkpointing, as QLoRA does, and at most one
# layer's experts are dense at a time.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from . import experts4bit, nf4
from .linear4bit import Stored4bit
from .nf4_weight import NF4Weight

_NAMES = "_nf4_parameters"  # instance attribute of an owner: its 4-bit parameters' names, in registration order
OWNER_KEYS = (_NAMES, "_nf4_order", "forward")  # what install() puts in an owner's instance dict
# Note: where LoRA's updates wait. LoraParameter hands the owner LoRA's update of a 4-bit
# parameter for one call (with_term). An eager call puts it in a context variable, per thread
# (or task), so two threads calling one model never see each other's: {(id(owner), name): term},
# never changed in place (with_term sets a copy). torch.compile cannot trace a ContextVar (each
# read would break the graph), so a call being compiled puts it in the owner's instance dict
# instead, as dynamo traces dict reads; compiled code is not shared between threads mid-call. An
# owner compiled on its own under an eager LoRA layer finds the eager count on its instance dict
# and reads the context variable too (a graph break, but the update is not lost).
_TERMS: contextvars.ContextVar[dict] = contextvars.ContextVar("lowrank_nf4_terms", default={})
_COMPILED_TERMS = "_nf4_terms"  # owner.__dict__ while compiling: {name: term}
_EAGER_TERMS = "_nf4_eager_terms"  # owner.__dict__: eager with_term contexts under way on the owner


class Weight4bit(Stored4bit):
    """One frozen 4-bit parameter of its parent module (See Note: a 4-bit parameter); it
    has no forward: its parent's forward reads it dense."""

    def __init__(self, weight: NF4Weight, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight; got {type(weight).__name__}")
        if compute_dtype is not None and compute_dtype not in nf4.DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {nf4.DTYPES}; got {compute_dtype!r}")
        self._set_weight(weight)
        self.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype`, by default its compute dtype (See Note: the dtype of a 4-bit
        parameter); a dtype NF4 does not decode to (float64: a reference copy) from the compute dtype."""
        if dtype is None or dtype in nf4.DTYPES:
            return self.dequantize(self.compute_dtype if dtype is None else dtype)
        return self.dequantize(self.compute_dtype).to(dtype)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a Weight4bit is a 4-bit parameter of its parent module, which reads it; it is not called")

    def extra_repr(self) -> str:
        q = self.weight
        return (f"shape={tuple(q.shape)}, nf4 blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"bits={q.bits_per_param:.3f}, compute_dtype={self.compute_dtype}")

    # -- the bitsandbytes entries at the parameter's own key: the parent's prefix + its name
    _entries_at_own_names = True  # its key.absmax is prefix + "absmax", its own parameter's name

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_weight(destination, prefix[:-1], keep_vars, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, local = prefix[:-1], dict(state_dict)
        if prefix in local:  # the packed codes, moved below the prefix by _packed_below
            local[key] = local.pop(prefix)
        assign = local_metadata.get("assign_to_params_buffers", False)  # load_state_dict(assign=True)
        own = self._own_entries(local, prefix)  # before the load, whose assign=True puts new tensors in their place
        ours = self._load_weight(local, key, missing_keys, error_msgs, assign, own)
        if strict:
            known = ours | own
            unexpected_keys.extend(k for k in local if k.startswith(prefix) and k not in known)


def _packed_below(owner, state_dict, prefix, *_) -> None:
    """load_state_dict hands a submodule only the keys below its prefix ("experts.gate_up_proj."),
    and a 4-bit parameter's packed codes sit at "experts.gate_up_proj" itself: the owner's
    pre-hook moves them to "experts.gate_up_proj." first, where the Weight4bit reads them."""
    for name in names_4bit(owner):
        if prefix + name in state_dict:
            state_dict[prefix + name + "."] = state_dict.pop(prefix + name)


def names_4bit(owner: nn.Module) -> tuple[str, ...]:
    """The names of `owner`'s 4-bit parameters (none for most modules)."""
    return owner.__dict__.get(_NAMES, ())


def stored(owner: nn.Module, name: str) -> Weight4bit | None:
    """`owner`'s 4-bit parameter `name`, or None where `name` is not one."""
    return owner._modules.get(name) if name in names_4bit(owner) else None


def has_parameter(owner: nn.Module, name: str) -> bool:
    """Whether `owner` has a parameter `name`, dense (not None) or 4-bit."""
    return isinstance(owner._parameters.get(name), torch.Tensor) or stored(owner, name) is not None


def parameter_shape(owner: nn.Module, name: str) -> torch.Size:
    """The shape of `owner`'s parameter `name`, dense or 4-bit."""
    q = stored(owner, name)
    return owner._parameters[name].shape if q is None else q.shape


def parameter_names(owner: nn.Module) -> list[str]:
    """`owner`'s parameters, dense and 4-bit, in the order it registered them (a quantized one
    keeps its place: PEFT nests LoRA layers, and names their tensors, in that order)."""
    order = owner.__dict__.get("_nf4_order", ())
    names = [n for n in order if n in owner._parameters or n in names_4bit(owner)]
    return names + [n for n in owner._parameters if n not in names]


# Note: the dtype of a 4-bit parameter. The owner's own code combines its parameters with its
# inputs (F.linear(x, W[e]), x @ W + b), and transformers' eager and batched_mm experts refuse
# two dtypes where grouped_mm casts x to W's. So the dense tensor takes the dtype of the call's
# first floating input, the activations: a float32 model whose linear layers compute in bf16
# (NF4Config(compute_dtype=torch.bfloat16)), or one cast with `.to(torch.bfloat16)` after
# quantize, or under FSDP2's mixed precision, runs its experts as the module would with a dense
# parameter of that dtype. Without a floating input it is the compute dtype (the dtype of the
# parameter it replaced unless NF4Config.compute_dtype said otherwise), which is also what LoRA
# factors, merges and exports take.
def input_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype of a call's first floating tensor argument (See Note: the dtype of a 4-bit parameter)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


class _DenseForward:
    """The owner's forward with its 4-bit parameters: routed or gathered where it can be (See
    Note: routed experts, Note: gathered experts, experts4bit.py), else dense (See Note: a 4-bit
    parameter). An object, not a bound method, so a pickled owner unpickles with it."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self, *args, **kwargs):
        owner = self.owner
        d, names = owner.__dict__, owner.__dict__[_NAMES]
        terms = _terms_of(owner)
        path, call = experts4bit.choose(owner, names, args, kwargs)
        if path == "routed":
            return experts4bit.forward(owner, *call, names, terms)
        if path == "gathered":
            return experts4bit.gathered_forward(owner, *call, names, terms)
        dtype, dense = input_dtype(args, kwargs), {}
        for name in names:
            w = owner._modules[name].dense(dtype)
            dense[name] = w if name not in terms else terms[name].updated(w)
        d.update(dense)
        try:
            return type(owner).forward(owner, *args, **kwargs)
        finally:
            for name in dense:
                d.pop(name, None)


def _terms_of(owner: nn.Module) -> dict:
    """{name: term} of LoRA's updates handed to `owner` for this call (See Note: where LoRA's
    updates wait)."""
    d = owner.__dict__
    terms = dict(d.get(_COMPILED_TERMS) or {})
    if not torch.compiler.is_compiling() or d.get(_EAGER_TERMS):
        under_way = _TERMS.get()
        if under_way:
            terms.update({n: t for (o, n), t in under_way.items() if o == id(owner)})
    return terms


class with_term:
    """`with with_term(owner, name, term):` the owner's forward adds LoRA's update `term` (an
    experts4bit.LowRankTerm) to its 4-bit parameter `name`: to each routed expert's product, or
    to the dense tensor. For this thread's calls only (See Note: where LoRA's updates wait)."""

    def __init__(self, owner: nn.Module, name: str, term) -> None:
        self.owner, self.name, self.term = owner, name, term

    def __enter__(self) -> None:
        d = self.owner.__dict__
        if torch.compiler.is_compiling():
            self.token, terms = None, d.setdefault(_COMPILED_TERMS, {})
            self.before, terms[self.name] = terms.get(self.name), self.term
            return
        self.token = _TERMS.set({**_TERMS.get(), (id(self.owner), self.name): self.term})
        d[_EAGER_TERMS] = d.get(_EAGER_TERMS, 0) + 1

    def __exit__(self, *exc) -> None:
        d = self.owner.__dict__
        if self.token is None:
            terms = d[_COMPILED_TERMS]
            if self.before is None:
                terms.pop(self.name, None)
            else:
                terms[self.name] = self.before
            return
        _TERMS.reset(self.token)
        left = d.get(_EAGER_TERMS, 0) - 1
        if left > 0:
            d[_EAGER_TERMS] = left
        else:
            d.pop(_EAGER_TERMS, None)


def check_owner(key: str, owner: nn.Module) -> None:
    """Raise where `owner`'s forward cannot be given 4-bit parameters (See Note: a 4-bit parameter)."""
    if "forward" in owner.__dict__ and not names_4bit(owner):
        raise ValueError(f"cannot quantize {key!r}: its module {type(owner).__name__} has a forward set on the "
                         "instance (a hook of another library); lowrank replaces that forward to read its 4-bit "
                         "parameters dense")


def quantize_parameter(owner: nn.Module, name: str, blocksize: int, double_quant: bool,
                       compute_dtype: torch.dtype | None) -> None:
    """Replace `owner`'s parameter `name` by a Weight4bit (See Note: a 4-bit parameter); the
    dense parameter is dropped here."""
    w = owner._parameters[name]
    stored_w = Weight4bit(nf4.quantize(w.detach(), blocksize, double_quant), compute_dtype)
    del w
    install(owner, name, stored_w)


def install(owner: nn.Module, name: str, stored_w: Weight4bit) -> None:
    """Put the Weight4bit `stored_w` in place of `owner`'s parameter `name` (dense, or on the meta
    device for a checkpoint read into 4 bits), which is dropped (See Note: a 4-bit parameter)."""
    d = owner.__dict__
    if _NAMES not in d:
        d["_nf4_order"] = tuple(owner._parameters)
        owner.register_load_state_dict_pre_hook(_packed_below)
    if name not in d["_nf4_order"]:  # a parameter the owner registered after its first one went 4-bit
        d["_nf4_order"] = (*d["_nf4_order"], name)
    del owner._parameters[name]
    owner._modules[name] = stored_w.train(owner.training)  # in its owner's mode, as every submodule of an eval model
    # in the order the owner registered its parameters, whatever order they came in (a load reads keys sorted)
    d[_NAMES] = tuple(n for n in d["_nf4_order"] if n in (*names_4bit(owner), name))
    for n in d[_NAMES]:  # after the owner's own submodules, as quantize leaves them
        owner._modules[n] = owner._modules.pop(n)
    d["forward"] = _DenseForward(owner)
