"""Linear4bit: a frozen NF4 linear layer, the base that LoRA wraps for QLoRA.

    y = x @ dequant(W_nf4)^T + b          (Dettmers et al. 2023, eq. 5, without the adapter)

The packed weight and its scales are frozen integer parameters (packed, absmax,
nested_absmax; see Note: frozen integer parameters) and the double-quantization offset an
integer buffer, so `.to(device)`, `state_dict`, DDP and FSDP2 see ordinary tensors; `self.weight`
gathers them into an NF4Weight for the `lowrank::nf4_linear` op. The state dict uses
bitsandbytes' / transformers' 4-bit keys (`weight`, `weight.absmax`, ..., `weight.quant_state.bitsandbytes__nf4`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops  # lowrank.ops imports lowrank.quant: its names are read at call time
from ..targets import is_gpt2_conv1d
from . import dsd, nf4
from .nf4_weight import BNB_QUANT_STATE_KEY, NF4Weight

_PARAMS = ("packed", "absmax", "nested_absmax")  # NF4Weight's tensor fields that FSDP2 shards (frozen parameters)
_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + BNB_QUANT_STATE_KEY)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """float32 -> its int32 bit pattern (a view, no copy); uint8 as it is."""
    return t.detach().view(torch.int32) if t.dtype == torch.float32 else t.detach()


def _as_float(t: torch.Tensor | None) -> torch.Tensor | None:
    """The inverse of _as_bits: int32 bit patterns -> float32 (a view)."""
    return t.view(torch.float32) if t is not None and t.dtype == torch.int32 else t


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype where it is on for x's device, else None."""
    # any autocast at all first: one C call, where x.device.type alone costs more
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2's shards) only: any other tensor subclass (a user's, torchao's, a
    FakeTensor) is a whole tensor here, and has no device_mesh or to_local to shard it by."""
    if not torch.distributed.is_available():  # a PyTorch built without it holds no DTensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shard_like(sharded: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` as a DTensor sharded as the DTensor `sharded` (its global shape) is: set_model_state_dict
    (full_state_dict=True) hands a sharded model whole tensors at bitsandbytes' keys, which it cannot shard
    itself, as they are none of the model's parameters. Replicated to sharded is a local cut, no communication."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = sharded.device_mesh
    device = mesh.device_type if sharded.is_meta else sharded.device  # meta shards: a model the load fills
    whole = DTensor.from_local(whole.to(device), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, sharded.placements)


class _KeyPath:
    """What torch.distributed.checkpoint.state_dict finds at each name of a 4-bit weight's
    state-dict key below its module: itself (See Note: state-dict keys as attribute paths)."""

    def __getattr__(self, name: str):
        if name in _KEY_NAMES:
            return self
        raise AttributeError(f"{name!r} is no name of a 4-bit weight's state-dict keys")


_KEY_NAMES = frozenset(n for s in _WEIGHT_KEYS for n in ("weight" + s).split("."))  # weight, absmax, quant_state, ...


class Stored4bit(nn.Module):
    """One frozen NF4 weight of any shape: its codes and scales as frozen integer parameters
    (packed, absmax, nested_absmax) and its offset an integer buffer (Note: frozen integer
    parameters), `weight` gathers them into an NF4Weight; and its bitsandbytes state-dict
    entries at one key. Linear4bit (a 2-D weight and its forward) and Weight4bit (a parameter
    of another module, lowrank/quant/params4bit.py) are the two kinds."""

    # Note: frozen integer parameters. FSDP2 (torch.distributed.fsdp.fully_shard) shards a
    # module's parameters along dim 0 and leaves its buffers whole on every rank, so the packed
    # weight and its scales are nn.Parameters with requires_grad=False: each rank then holds
    # about 1/world of a 4-bit model. They are integer tensors (See Note: the scales stay
    # float32), which can never require grad, so no optimizer state, DDP gradient hook or
    # FSDP2 reduce-scatter is ever made for them. FSDP2 all-gathers a group of mixed dtypes
    # through one uint8 buffer (foreach_all_gather), so uint8 and int32 shards travel
    # together, bit for bit. The state dict is written by hand below, so its keys and dtypes
    # stay bitsandbytes' whatever the storage.
    #
    # Note: the scales stay float32. model.half() or model.to(torch.bfloat16) casts every
    # floating parameter and buffer, and FSDP2's MixedPrecisionPolicy(param_dtype=...) every
    # floating parameter, but the codec's float32 scales (absmax without double quantization,
    # nested_absmax, offset) belong to the NF4 format, not to the compute dtype. So they are
    # stored as their int32 bit patterns, which every cast leaves alone (FSDPParam clamps
    # param_dtype to None for a non-floating parameter), and `weight` views them back as
    # float32: devices change, values do not.
    #
    # Note: state-dict keys as attribute paths. torch.distributed.checkpoint.state_dict
    # (get_model_state_dict, set_model_state_dict) checks each state-dict key by walking its
    # dotted names as attributes from the model, and raised at bitsandbytes' names, which are no
    # attributes here ("'NF4Weight' object has no attribute 'quant_map'"). `_fqn_modifiers` is
    # its hook for modules whose keys are not their attributes: an attribute to step through
    # before a name, here a _KeyPath, which has every name of those keys.
    _state_keys = _KeyPath()
    _entries_at_own_names = False  # whether key.absmax is this module's own parameter name (Weight4bit's is)

    def _fqn_modifiers(self) -> dict[str, str]:
        return dict.fromkeys(_KEY_NAMES, "_state_keys")

    def _set_weight(self, q: NF4Weight) -> None:
        for field in _PARAMS:
            t = getattr(q, field)
            self.register_parameter(field, None if t is None else nn.Parameter(_as_bits(t), requires_grad=False))
        # the offset is one float, 0-d: a buffer, whole on every rank (FSDP2 shards along dim 0 only)
        self.register_buffer("offset", None if q.offset is None else _as_bits(q.offset))
        self.shape, self.dtype, self.blocksize = q.shape, q.dtype, q.blocksize

    def op_fields(self) -> tuple:
        """The packed weight as the lowrank:: ops take it: (packed, absmax, nested_absmax, offset,
        shape, blocksize), the float32 scales viewed back from their bits (Note: the scales stay
        float32). Read from the dicts (Note: lookups on the hot path, lowrank/tuners/base.py): an
        NF4Weight checks itself on construction, and this runs on every forward of every 4-bit
        layer and routed expert (the ops check their arguments anyway)."""
        p = self._parameters
        return (p["packed"], _as_float(p["absmax"]), _as_float(p["nested_absmax"]), _as_float(self._buffers["offset"]),
                self.shape, self.blocksize)

    def codec_tensors(self) -> list[torch.Tensor]:
        """The tensors that store the 4-bit weight (parameters and buffer), for counting."""
        return [t for t in (self.packed, self.absmax, self.nested_absmax, self.offset) if t is not None]

    @property
    def weight(self) -> NF4Weight:
        # See Note: the scales stay float32.
        return NF4Weight(self.packed, _as_float(self.absmax), self.shape, self.dtype, self.blocksize,
                         _as_float(self.nested_absmax), _as_float(self.offset))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in `dtype` (default: the dtype it was quantized from)."""
        return ops.nf4_dequantize(self.weight, dtype)

    def _save_weight(self, destination: dict, key: str, keep_vars: bool, prefix: str = "") -> None:
        """Write the weight's bitsandbytes entries at `key` (key, key.absmax, ...); `prefix` is this module's."""
        if dsd.ignoring_frozen_params():  # its storage at its own names, for torch to pop (Note: options torch
            for f in _PARAMS:  # matches by parameter names, lowrank/quant/dsd.py)
                if (t := self._parameters[f]) is not None:  # as torch writes a parameter (keep_vars: itself)
                    destination[prefix + f] = t if keep_vars else t.detach()
            return
        for k, t in self.weight.to_state_dict(key).items():
            destination[k] = t if keep_vars else t.detach()

    def _load_weight(self, state_dict: dict, key: str, missing_keys: list, error_msgs: list,
                     assign: bool = False, own: set[str] = frozenset()) -> set[str]:
        """Read the weight's bitsandbytes entries at `key` into this module (its shape must match),
        on this module's device, or as they are with load_state_dict(assign=True) (as torch assigns:
        a model on the meta device takes the checkpoint's tensors); returns the keys that were its entries.
        `own`: the keys at which `state_dict` holds this layer's own tensors (_own_entries)."""
        ours = {key + s: state_dict[key + s] for s in _WEIGHT_KEYS if key + s in state_dict}
        broadcast = dsd.broadcasting_from_rank0()
        if broadcast and self._entries_at_own_names:
            error_msgs.append(f"while loading the 4-bit parameter {key!r}: set_model_state_dict(broadcast_from_rank0=True) "
                              f"cannot load it: its entries {key + '.absmax'!r} (and .nested_absmax) have the names of "
                              "its own integer parameters, and torch copied rank 0's float32 scales into them as "
                              "numbers, so its values are not the checkpoint's; load with full_state_dict=True and "
                              "the state dict on every rank, or before fully_shard")
            return set(ours)
        if broadcast:  # rank 0's entries, which torch left out on the other ranks
            ours = dsd.entries_from_rank0(ours, self.packed)  # (Note: options torch matches by parameter names)
        if key not in ours:
            # all of its storage at its own names: set_model_state_dict(full_state_dict=True) filled what the
            # checkpoint lacks from the model itself, and the layer keeps its values, as a dense weight does (an
            # adapters-only state dict, ignore_frozen_params=True, loads with strict=True as on a dense base)
            if len(own) < len(self.codec_tensors()):
                missing_keys.append(key)
            return set(ours)
        dense = ours[key]
        if len(ours) == 1 and dense.is_floating_point():  # a full-precision checkpoint (its weight alone)
            error_msgs.append(f"{key!r} is a dense {dense.dtype} weight of shape {tuple(dense.shape)} in the checkpoint; "
                              f"this module holds it in 4 bits {tuple(self.shape)}: load a dense checkpoint before "
                              "quantize (or with lowrank.load_and_quantize), a 4-bit one (state_dict()) after")
            return set(ours)
        if any(t.is_meta for t in ours.values()):  # a skeleton's state dict: its quant state holds no JSON to read
            if not self.packed.is_meta:  # into meta tensors a no-op, as torch copies meta into meta
                error_msgs.append(f"while loading the 4-bit weight {key!r}: the checkpoint's entries are on the meta device, "
                                  "with no values (the state dict of a model built under lowrank.skeleton() or from "
                                  "meta weights, not loaded); load one that holds values")
            return set(ours)
        try:
            q = NF4Weight.from_state_dict(ours, key)
        except (KeyError, ValueError) as e:
            error_msgs.append(f"while loading the 4-bit weight {key!r}: {e}")
            return set(ours)
        if q.shape != self.shape:
            error_msgs.append(f"size mismatch for {key}: the checkpoint's 4-bit weight has shape {tuple(q.shape)}, "
                              f"this module {tuple(self.shape)}")
        elif _is_dtensor(self.packed.data) and not self._storage_fits(q):  # FSDP2's shards
            # new tensors of other sizes in place of FSDP2's sharded parameters, which it cannot take after
            # fully_shard: its next hook failed on them ("'Parameter' object has no attribute '_local_tensor'")
            have, want = (f"blocksize {w.blocksize}, double_quant={w.double_quant}" for w in (q, self.weight))
            error_msgs.append(f"while loading the 4-bit weight {key!r}: the checkpoint stores it with {have}, this "
                              f"layer, sharded by FSDP2, with {want}; FSDP2 cannot take tensors of other sizes "
                              "after fully_shard: quantize with the checkpoint's settings (NF4Config(blocksize=..., "
                              "double_quant=...)) before fully_shard, or load the checkpoint before fully_shard")
        else:
            # as torch loads: assign=True takes the checkpoint's tensors, otherwise the layer holds copies
            # (a state dict loaded into two models, or changed afterwards, is not shared with them): written
            # into the tensors it holds where the layouts agree, as torch's param.copy_ (new ones beside a
            # state dict that holds the old, model.state_dict() or torch.distributed.checkpoint's, doubled
            # the 4-bit model's memory for the load)
            if assign:
                sharded = {f: p for f in _PARAMS if (p := self._parameters[f]) is not None and _is_dtensor(p.data)}
                self._set_weight(q)
                for f, p in sharded.items():  # FSDP2's shards (on the meta device: a model the load fills): the new
                    new = self._parameters[f]  # tensors sharded alike, as torch distributes a parameter it assigns
                    if new is not None and new.shape == p.shape:
                        self._parameters[f] = nn.Parameter(_shard_like(p, new.detach()), requires_grad=False)
            elif not self._copy_into(q):
                self._set_weight(q.to(self.packed.device, copy=True))
        return set(ours)

    def _own_entries(self, state_dict: dict, prefix: str) -> set[str]:
        """The keys at which `state_dict` holds this layer's own storage tensors by their names (packed,
        absmax, ...), never a checkpoint's: set_model_state_dict(full_state_dict=True) adds every parameter
        and buffer of the model so, beside the checkpoint's entries. Nothing to load from them."""
        own = {f: self._parameters[f] for f in _PARAMS} | {"offset": self._buffers["offset"]}
        return {prefix + f for f, t in own.items() if t is not None and state_dict.get(prefix + f) is t}

    def _storage_fits(self, q: NF4Weight) -> bool:
        """Whether `q`'s tensors have the sizes and dtypes of this layer's (whole sizes, for FSDP2's shards)."""
        pairs = [(self._parameters[f], getattr(q, f)) for f in _PARAMS]
        return all((a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, _as_bits(b).dtype))
                   for a, b in pairs)

    def _copy_into(self, q: NF4Weight) -> bool:
        """Copy `q` into this layer's own tensors in place, taking its dtype and blocksize (a checkpoint
        quantized from bf16 fills the tensors of a layer quantized from float32: the same sizes); False
        (nothing written) when the sizes differ (blocksize, double quantization), or the layer's are meta,
        or sharded and `q`'s sharded otherwise. Whole tensors into sharded ones (FSDP2): each rank its part (_shard_like)."""
        mine = [self._parameters[f] for f in _PARAMS] + [self._buffers["offset"]]
        theirs = [getattr(q, f) for f in _PARAMS] + [q.offset]
        pairs = []
        for a, b in zip(mine, theirs):
            if (a is None) != (b is None):
                return False
            if a is not None:
                b = _as_bits(b)
                if (a.shape, a.dtype) != (b.shape, b.dtype) or a.is_meta:
                    return False
                if _is_dtensor(a.data):  # FSDP2's shard: into the view of its own storage
                    if not _is_dtensor(b):  # a whole tensor, of whatever class
                        a, b = a.to_local(), _shard_like(a, b).to_local()
                    elif (b.device_mesh, b.placements) == (a.device_mesh, a.placements):  # sharded alike
                        a, b = a.to_local(), b.to_local()
                    else:
                        return False  # sharded otherwise: new tensors (FSDP2 takes them after the load)
                    if a.shape != b.shape:
                        return False
                pairs.append((a, b))
        with torch.no_grad():
            for a, b in pairs:
                a.copy_(b)
        self.dtype, self.blocksize = q.dtype, q.blocksize  # what the codes mean, as _set_weight takes them
        return True


class Linear4bit(Stored4bit):
    """A frozen 4-bit linear: in_features, out_features, forward, dequantize() (see Note: the
    base protocol, in lowrank/tuners/lora.py), so LoRA and DoRA wrap it unchanged."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight) or len(weight.shape) != 2:
            seen = tuple(weight.shape) if isinstance(weight, NF4Weight) else type(weight).__name__
            raise ValueError(f"weight must be an NF4Weight of shape (out_features, in_features); got {seen}")
        if compute_dtype is not None and compute_dtype not in nf4.DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {nf4.DTYPES}; got {compute_dtype!r}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},); got {tuple(bias.shape)}")
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an nn.Linear (or a GPT-2 Conv1D, whose (in, out) weight is transposed
        first). `linear` is read, never changed: lowrank.quantize drops it once replaced."""
        if isinstance(linear, nn.Linear):
            w = linear.weight  # (out, in)
        elif is_gpt2_conv1d(linear):
            w = linear.weight.T.contiguous()  # (in, out) -> (out, in)
        else:
            raise TypeError(f"Linear4bit.from_linear takes an nn.Linear or a GPT-2 Conv1D; got {type(linear).__name__}")
        # in `linear`'s train/eval mode, as a module put in its place must be: a Linear4bit made in training
        # mode in an eval model (from_pretrained's) would turn on the dropout of the LoRA layer inject wraps it in
        return cls(nf4.quantize(w.detach(), blocksize, double_quant), linear.bias, compute_dtype).train(linear.training)

    # y = x @ dequant(W_nf4)^T + b, in compute_dtype. Under autocast the layer computes in the
    # autocast dtype and returns it, as nn.Linear does; otherwise it returns x's dtype, as
    # bitsandbytes' Linear4bit does.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = autocast_dtype(x)
        dtype = self.compute_dtype if autocast is None else autocast
        bias = self._parameters.get("bias")  # absent, not None, when the layer has no bias (a plain attribute then)
        # a cast only where the dtype differs: Tensor.to returns the tensor itself then, but the call
        # alone costs ~0.7 us here, twice a decoding step's layer (Note: lookups on the hot path)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        x_in = x if x.dtype == dtype else x.to(dtype) if x.is_floating_point() else None
        if x_in is None:  # token ids, a mask: cast in and back they gave an integer "output" (bitsandbytes does)
            raise TypeError(f"Linear4bit takes floating-point x; got a {x.dtype} tensor of shape {tuple(x.shape)}")
        y = torch.ops.lowrank.nf4_linear(x_in, *self.op_fields(), bias)  # (..., in) -> (..., out)
        return y.to(x.dtype) if autocast is None and y.dtype != x.dtype else y

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype a call on x computes in (and, under autocast, returns)."""
        autocast = autocast_dtype(x)
        return self.compute_dtype if autocast is None else autocast

    def extra_repr(self) -> str:
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={q.blocksize}, double_quant={q.double_quant}, bits={q.bits_per_param:.3f}, "
                f"compute_dtype={self.compute_dtype}")

    # -- the bitsandbytes / transformers 4-bit state dict ----------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._save_weight(destination, prefix + "weight", keep_vars, prefix)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w_key, b_key = prefix + "weight", prefix + "bias"
        assign = local_metadata.get("assign_to_params_buffers", False)
        own = self._own_entries(state_dict, prefix)  # before the load, whose assign=True puts new tensors in their place
        ours = self._load_weight(state_dict, w_key, missing_keys, error_msgs, assign, own)
        if self.bias is not None and b_key not in state_dict:
            missing_keys.append(b_key)
        elif self.bias is not None:
            b = state_dict[b_key]
            if b.shape != self.bias.shape:
                error_msgs.append(f"size mismatch for {b_key}: checkpoint {tuple(b.shape)}, this layer {tuple(self.bias.shape)}")
            elif assign:
                self.bias = nn.Parameter(b.detach(), requires_grad=self.bias.requires_grad)  # as torch assigns
            else:
                try:  # as torch: a copy that fails (out of a meta tensor) is one of the load's errors, with its key
                    with torch.no_grad():
                        self.bias.copy_(b)
                except Exception as e:
                    error_msgs.append(f"while copying {b_key!r}: {type(e).__name__}: {e}")
        if strict:
            known = set(ours) | own | ({b_key} if self.bias is not None else set())
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
