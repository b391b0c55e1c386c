"""LoadPlanner4bit: torch.distributed.checkpoint.load of a 4-bit checkpoint whose quant-state JSON
has another length than the model's (unpadded, or another dtype's).

    import torch.distributed.checkpoint as dcp
    from lowrank.quant.dcp_planner import LoadPlanner4bit

    sd = model.state_dict()  # or get_model_state_dict(model)
    dcp.load(sd, checkpoint_id=path, planner=LoadPlanner4bit())
    model.load_state_dict(sd)  # or set_model_state_dict(model, sd)

# Note: loading an unpadded quant state. The quant state of a double-quantized weight is padded
# to a length that depends on the layout alone (Note: the quant state's length, nf4_weight.py).
# A DCP checkpoint saved before that padding, or from bitsandbytes' own state dict, holds the
# bare JSON, whose length varied with the offset: DCP's default planner refuses to read it into
# the model's longer tensor ("Size mismatch between saved torch.Size([164]) and current:
# torch.Size([176]) for ...quant_state.bitsandbytes__nf4") before any of lowrank's code runs.
# This planner reads such an entry into a tensor of the saved length, then writes it into the
# state dict's own tensor followed by spaces, the padded form the model writes (JSON allows them).
# A longer one (a checkpoint quantized from bf16, whose JSON names "bfloat16", into a model
# quantized from float32: the same tensors otherwise, which the layers take, dtype and all) is read
# into a new tensor in the state dict's place: a quant state is no storage of the model. Every
# other entry loads as DefaultLoadPlanner loads it.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .nf4_weight import BNB_QUANT_STATE_KEY

_SPACE = ord(" ")


class LoadPlanner4bit(DefaultLoadPlanner):
    """DefaultLoadPlanner that also reads a 4-bit quant state of another length than the state
    dict's: a shorter (unpadded) one into its tensor, padded with spaces, a longer one in its place
    (See Note: loading an unpadded quant state)."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self._short: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key: (the state dict's tensor, the read one)
        saved = metadata.state_dict_metadata if metadata is not None else {}
        reads = {}  # key: the tensor DCP reads the saved entry into
        for key, t in self.state_dict.items():  # flattened: the keys the checkpoint has
            md = saved.get(key)
            if (key.endswith(BNB_QUANT_STATE_KEY) and isinstance(md, TensorStorageMetadata)
                    and type(t) is torch.Tensor and not t.is_meta and t.dim() == 1 and t.dtype == torch.uint8
                    and len(md.size) == 1 and md.size[0] != t.numel()):
                read = torch.empty(md.size, dtype=t.dtype, device=t.device)
                if md.size[0] < t.numel():  # read into this, the state dict keeps its own tensor
                    self._short[key] = (t, read)
                elif self.flatten_state_dict:  # longer: it cannot; the read tensor takes its place (a quant
                    set_element(self.original_state_dict, self.mappings[key], read)  # state is no storage)
                else:
                    self.original_state_dict[key] = read
                reads[key] = read
        self.state_dict.update(reads)

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        super().commit_tensor(read_item, tensor)
        key = read_item.dest_index.fqn
        if key in self._short:  # the saved JSON, then spaces up to the model's length
            own, read = self._short[key]
            with torch.no_grad():
                own[: read.numel()].copy_(read)
                own[read.numel():].fill_(_SPACE)
            if self.state_dict is self.original_state_dict:  # nothing flattened: its own tensor back
                self.original_state_dict[key] = own
