"""Assertions shared by the DDP and FSDP2 tests."""

import pathlib

import torch

from lowrank import save_adapter


def trained_as_one_process(r: dict, model) -> None:
    """See Note: the same arithmetic as one process (cases.py): exact equality."""
    ref = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(r["trained"]) == sorted(ref)
    differ = [n for n in ref if not torch.equal(r["trained"][n], ref[n])]
    assert not differ, f"{len(differ)} of {len(ref)} adapter tensors differ from one process's, e.g. {differ[:3]}"


def frozen_stay_frozen(r: dict, model) -> None:
    """Every frozen parameter (gathered) as before training, with no gradient; every adapter
    tensor moved; optimizer state for adapter tensors only."""
    adapters = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert sorted(r["unchanged"]) == frozen and r["frozen_flags"] == []
    assert r["with_state"] == adapters  # AdamW was handed every parameter; only adapters got state


def same_adapter_directory(saved: str, model, tmp_path: pathlib.Path) -> None:
    """The directory written under DDP / FSDP equals what one process writes for its model."""
    from safetensors.torch import load_file

    ours = save_adapter(model, tmp_path / "one-process")
    got = load_file(pathlib.Path(saved, "adapter_model.safetensors"))
    want = load_file(ours / "adapter_model.safetensors")
    assert got and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert pathlib.Path(saved, "adapter_config.json").read_text() == (ours / "adapter_config.json").read_text()
