"""An adapter file written by PEFT loads in lowrank, and lowrank's loads in PEFT, to the same outputs."""

from __future__ import annotations

import copy
import warnings

import torch

from lowrank import io as lio


def files_go_both_ways(base, x, theirs, ours, tmp_path):
    """PEFT's `theirs` saved and loaded into a copy of `base` by lowrank, lowrank's `ours` saved and
    loaded by PEFT: each computes on `x` exactly what the model it came from computes. Returns the
    lowrank model loaded from PEFT's file."""
    import peft

    theirs.eval(), ours.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = copy.deepcopy(base)
    lio.load_adapter(loaded, tmp_path / "peft")
    lio.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warnings about the base (e.g. grouped convolutions)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), theirs(x))
        assert torch.equal(back(x), ours(x))
    return loaded
