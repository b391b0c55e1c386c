"""What each rank runs for test_wrapped.py: a model already inside DistributedDataParallel or
fully_shard, in the states a training script leaves it in (after an eval forward, with
reshard_after_forward=False, under bf16 mixed precision), and the verbs called on it then.
Each check records what it saw; the test compares it with one process."""

from __future__ import annotations

import os
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel

import lowrank
from lowrank.distributed import reshard
from tests.tuners import models

CONFIG = lowrank.LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "lm_head"))


def adapted(base: str = "plain"):
    model = models.llama()
    if base == "nf4":
        lowrank.quantize(model)
    torch.manual_seed(1)
    lowrank.inject(model, CONFIG)
    models.randomize_adapters(model)  # seeded: every rank and the test process make the same B != 0
    return model


def shard(model, mesh, **kwargs) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def refused(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001: what it raised is the result
        return f"{type(e).__name__}: {e}"
    return "accepted"


def ddp_checks(rank: int, out: str) -> dict:
    model = DistributedDataParallel(adapted())
    found = {"inject": refused(lambda: lowrank.inject(model, CONFIG, name="late"))}
    lowrank.save_adapter(model, os.path.join(out, "ddp-adapter"))  # every rank: rank 0 writes
    export = lowrank.merge_and_export(model, os.path.join(out, "ddp-export"))
    found["export"] = None if export is None else export.files
    quantized = DistributedDataParallel(models.llama())
    lowrank.quantize(quantized.module)
    found["save_quantized"] = lowrank.save_quantized(quantized, os.path.join(out, "ddp-quantized"))
    return found


def fsdp_checks(rank: int, out: str, mesh) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    x = models.ids(batch=2, seq=8, seed=3)
    model = adapted()
    shard(model, mesh, reshard_after_forward=False)
    with torch.no_grad():
        model.eval()
        before = model(input_ids=x).logits  # leaves every FSDP module unsharded
    found = {"inject": refused(lambda: lowrank.inject(model, CONFIG, name="late")),
             "quantize": refused(lambda: lowrank.quantize(model))}
    found["merged"] = lowrank.merge(model)
    with torch.no_grad():
        found["logits"] = (before, model(input_ids=x).logits)
    reshard(model)
    with torch.no_grad():
        found["logits_after_reshard"] = model(input_ids=x).logits
    found["export"] = refused(lambda: lowrank.merge_and_export(model, os.path.join(out, "fsdp-export")))
    mixed = adapted()
    shard(mixed, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with torch.no_grad():
        mixed.eval()
        mixed(input_ids=x)  # the root's parameters are its bf16 copies now
    lowrank.save_adapter(mixed, os.path.join(out, "fsdp-mixed-adapter"))
    return found


def worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, fn in [("ddp", lambda: ddp_checks(rank, out)), ("fsdp", lambda: fsdp_checks(rank, out, mesh))]:
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out, f"wrapped{rank}.pt"))
