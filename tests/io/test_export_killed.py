"""SIGKILL a process that exports over and over (overwrite=True): whatever moment the kill
lands, the export directory is one whole export, never a mix of two or a half-written one
(Note: atomic directories, lowrank/shards.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import torch

from lowrank import shards

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Two layers with W0 = 0 and A = 1, so each merged weight is the constant s * r * i after the
# i-th save: every shard says which save wrote it.
EXPORTER = """
import sys, torch
sys.path.insert(0, {root!r})
import lowrank
model = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.Linear(128, 128, bias=False))
torch.nn.init.zeros_(model[0].weight); torch.nn.init.zeros_(model[1].weight)
lowrank.inject(model, lowrank.LoraConfig(r=4, alpha=4, targets=["0", "1"]))
for layer in model:
    torch.nn.init.ones_(layer.lora_A["default"].weight)
print("ready", flush=True)
i = 0
while True:
    i += 1
    with torch.no_grad():
        for layer in model:
            layer.lora_B["default"].weight.fill_(float(i))
    lowrank.merge_and_export(model, {out!r}, max_shard_size="64KB", overwrite=True)
"""


def test_killed_export_leaves_a_whole_directory(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", EXPORTER.format(root=str(ROOT), out=str(out))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:  # at least one export done
            time.sleep(0.05)
        time.sleep(0.7)
    finally:
        proc.kill()
        proc.wait()
    if not out.exists():  # killed between moving the old one aside and renaming the new one in,
        a, b = tmp_path / "p", tmp_path / "q"  # which happens only where paths cannot be exchanged
        a.mkdir(), b.mkdir()
        assert not shards.exchange(a, b), "with an exchanging rename the target is never missing"
        (out,) = [p / "x" for p in tmp_path.glob(".out.*.old")]
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors",
                                                       "model.safetensors.index.json"]
    state = shards.read(out)  # every shard whole and readable
    values = {k: t.unique().tolist() for k, t in state.items()}
    assert sorted(values) == ["0.weight", "1.weight"]
    assert values["0.weight"] == values["1.weight"] and len(values["0.weight"]) == 1  # one save's values
    assert values["0.weight"][0] > 0 and torch.equal(state["0.weight"], state["1.weight"])
