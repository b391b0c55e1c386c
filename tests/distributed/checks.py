"""Checks shared by the DDP and FSDP2 tests: the first two return what is wrong (empty when
nothing is), which the tests assert empty; the last asserts itself."""

import pathlib

import torch

from lowrank import save_adapter


def not_as_one_process(r: dict, model) -> list[str]:
    """What differs from one process's training (See Note: the same arithmetic as one process,
    cases.py: exact equality); [] when nothing does."""
    ref = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if sorted(r["trained"]) != sorted(ref):
        return [f"trained tensors {sorted(r['trained'])}, one process's {sorted(ref)}"]
    differ = [n for n in ref if not torch.equal(r["trained"][n], ref[n])]
    return [f"{len(differ)} of {len(ref)} adapter tensors differ from one process's, e.g. {differ[:3]}"] if differ else []


def frozen_problems(r: dict, model) -> list[str]:
    """Every frozen parameter (gathered) as before training, with no gradient; every adapter
    tensor moved; optimizer state for adapter tensors only. What is not so; [] when all is."""
    adapters = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    problems = []
    if sorted(r["unchanged"]) != frozen:
        problems.append(f"unchanged {sorted(r['unchanged'])}, frozen {frozen}")
    if r["frozen_flags"] != []:
        problems.append(f"frozen parameters with a gradient: {r['frozen_flags']}")
    if r["with_state"] != adapters:  # AdamW was handed every parameter; only adapters got state
        problems.append(f"optimizer state for {r['with_state']}, adapters {adapters}")
    return problems


def same_adapter_directory(saved: str, model, tmp_path: pathlib.Path) -> None:
    """The directory written under DDP / FSDP equals what one process writes for its model."""
    from safetensors.torch import load_file

    ours = save_adapter(model, tmp_path / "one-process")
    got = load_file(pathlib.Path(saved, "adapter_model.safetensors"))
    want = load_file(ours / "adapter_model.safetensors")
    assert got and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert pathlib.Path(saved, "adapter_config.json").read_text() == (ours / "adapter_config.json").read_text()
