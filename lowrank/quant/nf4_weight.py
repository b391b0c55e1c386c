"""NF4Weight: one quantized weight, and its bitsandbytes / transformers state-dict form.

A frozen dataclass of plain tensors, not a tensor subclass: a 4-bit linear layer keeps
its fields as buffers, kernels take them as arguments, and nothing has to teach PyTorch's
op dispatch what a packed weight is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator

import torch

BNB_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"  # transformers / bitsandbytes key suffix

# Note: the quant state's length. The JSON of a double-quantized weight holds its offset, a
# float whose text varies in length with its value ("0.01" .. "-2.1561867752369213e-38"), so the
# uint8 tensor that holds it had a length that depended on the weights: a state dict loaded in
# place, into tensors of the model's own shapes (torch.distributed.checkpoint.load, into a
# fresh model's state_dict()), refused the checkpoint's entry ("Size mismatch between saved
# torch.Size([168]) and current: torch.Size([167])"). The JSON is therefore padded with spaces
# to the length the longest offset would give, which depends on the layout alone (shape, dtype,
# blocksize). JSON allows whitespace after the value: bitsandbytes' QuantState.from_dict (which
# transformers' loading calls) and from_state_dict below read it as before; the bytes are
# bitsandbytes' followed by spaces. Without double quantization nothing varies: bitsandbytes' bytes.
# A DCP checkpoint with the bare JSON (saved before this padding) loads with
# dcp_planner.LoadPlanner4bit (Note: loading an unpadded quant state).
_OFFSET_CHARS = 23  # the longest JSON of a float32: sign, 17 significant digits, point, "e-38" (or "0.000" before them)


def _sizes(shape) -> torch.Size:
    """shape as a torch.Size of sizes >= 0 (integers of any type, numpy's too, become ints)."""
    try:
        sizes = torch.Size(d if isinstance(d, torch.SymInt) else operator.index(d) for d in shape)
    except TypeError:
        sizes = None
    if sizes is None or any(d < 0 for d in sizes):
        raise ValueError(f"NF4Weight.shape must be integer sizes >= 0; got {shape!r}")
    return sizes


@dataclasses.dataclass(frozen=True, eq=False)  # eq below: a dataclass's == asks bool() of a tensor comparison
class NF4Weight:
    packed: torch.Tensor  # uint8 (ceil(n/2),): two codes a byte, first element in the high nibble
    absmax: torch.Tensor  # (B,) float32 scales, or uint8 codes into the dynamic map when double-quantized
    shape: torch.Size  # the original weight's shape; n = prod(shape)
    dtype: torch.dtype  # the original weight's dtype, what dequantize returns by default
    blocksize: int  # elements per scale, along the row-major flattening
    nested_absmax: torch.Tensor | None = None  # (ceil(B/256),) float32, only when double-quantized
    offset: torch.Tensor | None = None  # float32 0-d: mean of the scales, only when double-quantized

    def __post_init__(self) -> None:
        from .nf4 import BLOCKSIZES, DTYPES  # here: nf4 imports this module

        if type(self.blocksize) is not int or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Weight.blocksize must be one of {BLOCKSIZES}; got {self.blocksize!r}")
        if self.dtype not in DTYPES:
            raise TypeError(f"NF4Weight.dtype must be one of {', '.join(map(str, DTYPES))}; got {self.dtype!r}")
        object.__setattr__(self, "shape", _sizes(self.shape))
        n, blocks = self.numel, math.ceil(self.numel / self.blocksize)
        expect = {"packed": ((n + 1) // 2, torch.uint8), "absmax": (blocks, torch.float32)}
        if self.double_quant:
            expect["absmax"] = (blocks, torch.uint8)
            expect["nested_absmax"] = (math.ceil(blocks / 256), torch.float32)
            expect["offset"] = (1, torch.float32)
        elif self.offset is not None:
            raise ValueError("offset is given but nested_absmax is not: both or neither (double quantization)")
        for field, (numel, dtype) in expect.items():
            t = getattr(self, field)
            if not isinstance(t, torch.Tensor) or t.numel() != numel or t.dtype != dtype:
                seen = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"NF4Weight.{field} must hold {numel} {dtype} values for a weight of shape "
                    f"{tuple(self.shape)} with blocksize {self.blocksize}; got {seen}"
                )
            # any layout of those values (bitsandbytes keeps packed as (bytes, 1)): flat, as the codec reads them
            flat = t.reshape(()) if field == "offset" else t.reshape(-1)  # a view where it can be one
            if flat.shape != t.shape:
                object.__setattr__(self, field, flat)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, bits_per_param={self.bits_per_param:.3f}, device={self.device})"
        )

    def __eq__(self, other: object) -> bool:
        """The same stored weight: shape, dtype, blocksize and every code and scale bit for bit
        (compared on the CPU when the two are on different devices). Meta weights have no
        values: one equals only itself."""
        if not isinstance(other, NF4Weight):
            return NotImplemented
        if self is other:
            return True
        if (self.shape, self.dtype, self.blocksize, self.double_quant) != (other.shape, other.dtype, other.blocksize,
                                                                          other.double_quant):
            return False
        if self.device.type == "meta" or other.device.type == "meta":
            return False
        if other.device != self.device:
            return self.to("cpu") == other.to("cpu")
        fields = ("packed", "absmax", "nested_absmax", "offset") if self.double_quant else ("packed", "absmax")
        return all(torch.equal(getattr(self, f), getattr(other, f)) for f in fields)

    def __hash__(self) -> int:  # equal weights have equal headers
        return hash((tuple(self.shape), self.dtype, self.blocksize, self.double_quant))

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales, and (double quantization) nested scales and offset."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight element: 4.127 for a large weight at blocksize 64 with
        double quantization (docs/nf4.md), 4.5 without."""
        return 8 * self.nbytes / self.numel if self.numel else math.nan

    def to(self, device: torch.device | str, copy: bool = False) -> NF4Weight:
        """The weight on `device` (self is left as it is): its own tensors where they are there
        already, unless copy=True."""
        if isinstance(device, torch.dtype):  # the fields' dtypes are the format's (uint8 codes, float32 scales)
            raise TypeError(f"NF4Weight.to takes a device, got the dtype {device}; the dtype of the dequantized "
                            "weight is dequantize's argument (q.dequantize(dtype), nf4_linear: x's dtype)")
        move = {
            f.name: getattr(self, f.name).to(device, copy=copy)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **move)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .nf4 import dequantize

        return dequantize(self, dtype)

    # -- the bitsandbytes / transformers state-dict entries of one weight --------------

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The entries bitsandbytes' Params4bit / transformers write for this weight:
        `prefix` (packed, shape (n_bytes, 1)), `prefix.absmax`, `prefix.quant_map`, and with
        double quantization `prefix.nested_absmax`, `prefix.nested_quant_map`; then
        `prefix.quant_state.bitsandbytes__nf4`, a uint8 tensor of UTF-8 JSON with the rest."""
        from .nf4 import DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4_CODE

        dev = self.device
        sd = {
            prefix: self.packed.view(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": NF4_CODE.to(dev, copy=True),  # a copy each (as bitsandbytes'): safetensors
            # refuses tensors that share memory (save_file(model.state_dict()), save_pretrained), and an in-place
            # write to a state dict (torch.distributed.checkpoint.load) must not reach the codec's own table
        }
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = DYNAMIC_CODE.to(dev, copy=True)
            meta |= {
                "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": "float32",
                "nested_offset": 0.0 if dev.type == "meta" else self.offset.item(),
            }
        text = json.dumps(meta)
        if self.double_quant:  # See Note: the quant state's length
            text = text.ljust(len(json.dumps(meta | {"nested_offset": 0.0})) - len("0.0") + _OFFSET_CHARS)
        state = torch.tensor(list(text.encode()), dtype=torch.uint8)
        # On the meta device (a model built to be loaded later) there is no offset to write: the entry is
        # a meta tensor too, so that nothing in the state dict holds values that were never computed.
        sd[f"{prefix}.{BNB_QUANT_STATE_KEY}"] = state.to("meta") if dev.type == "meta" else state
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        """Read the entries written by to_state_dict, bitsandbytes or transformers."""
        from .nf4 import BLOCKSIZES, DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4_CODE

        def entry(suffix: str) -> torch.Tensor:
            key = f"{prefix}.{suffix}" if suffix else prefix
            if key not in sd:
                near = sorted(k for k in sd if k.startswith(prefix))[:8]
                raise KeyError(f"4-bit state dict has no entry {key!r}; entries under {prefix!r}: {near}")
            return sd[key]

        meta = json.loads(bytes(entry(BNB_QUANT_STATE_KEY).cpu().tolist()).decode())
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={meta.get('quant_type')!r}")
        if meta["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {meta['blocksize']!r}")
        if not torch.equal(entry("quant_map").float().cpu(), NF4_CODE):
            raise ValueError(f"{prefix}.quant_map is not the NF4 codebook; this checkpoint uses another 4-bit type")
        fields = {
            "packed": entry("").reshape(-1).view(torch.uint8),
            "absmax": entry("absmax").reshape(-1),
            "shape": torch.Size(meta["shape"]),
            "dtype": getattr(torch, meta["dtype"]),
            "blocksize": meta["blocksize"],
        }
        if "nested_offset" in meta:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or meta.get("nested_dtype") != "float32":
                raise ValueError(
                    f"nested scales must be float32 in blocks of {NESTED_BLOCKSIZE}; got blocksize "
                    f"{meta.get('nested_blocksize')!r}, dtype {meta.get('nested_dtype')!r}"
                )
            if not torch.equal(entry("nested_quant_map").float().cpu(), DYNAMIC_CODE):
                raise ValueError(f"{prefix}.nested_quant_map is not the signed 8-bit dynamic map")
            fields["nested_absmax"] = entry("nested_absmax").reshape(-1)
            fields["offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=fields["packed"].device)
        return cls(**fields)
