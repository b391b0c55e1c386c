"""What the distributed tests train, and the code each rank runs.

Every case is (mode, config, base): mode "ddp" or "fsdp", a config from CONFIGS, a base
from BASES. To cover a new tuner, add its config to CONFIGS: the ranks run it under DDP and
FSDP2 and every test in this folder checks it.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel

from lowrank import AdamW8bit, AdapterConfig, LoraConfig, NF4Config, PrefixConfig, PromptConfig, inject, load_adapter, quantize, save_adapter, summary
from lowrank.distributed import full_tensor
from tests.tuners import models

# Note: the same arithmetic as one process. The global batch is WORLD * PER_RANK sequences;
# rank r trains on rows [r * PER_RANK, (r + 1) * PER_RANK). DDP and FSDP2 average the ranks'
# gradients, so one step follows the gradient of the mean of the ranks' mean losses, which
# is the mean loss over the global batch (equal-length sequences, no padding). The
# single-process reference computes that same gradient in the same float32 operations: each
# rank's half-batch forward and backward with the loss scaled by 1/WORLD, the halves
# accumulated in rank order. Scaling by 1/2 is exact in binary floating point, and with two
# ranks the reduction is one addition, which commutes; the all-gathers and broadcasts copy
# bits. So the tolerance is zero: the trained adapters must be equal, bit for bit.
# (A full-batch forward would sum the same terms in another order: mathematically the same
# training, different rounding, so it is not what an exact test can compare against.)

# Note: one thread. A CPU matmul may split its sums differently with a different number of
# threads; every rank and the reference run with one (spawn.py, `one_thread`).

WORLD = 2
PER_RANK = 2  # sequences per rank
STEPS = 3
LR = 1e-2

CONFIGS = {
    "lora": LoraConfig(r=4, alpha=8, targets="all-linear"),
    "dora": LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"), dora=True),  # reads the (gathered) base weight
    "adapter": AdapterConfig(bottleneck_size=8),  # Pfeiffer: after each LlamaMLP
    "prompt": PromptConfig(num_virtual_tokens=4),  # a (4, hidden) prompt before the input embeddings
    "prefix": PrefixConfig(num_virtual_tokens=4),  # P-tuning v2: (4, 2 d_kv) per attention layer
    "prefix-mlp": PrefixConfig(num_virtual_tokens=4, projection_hidden=8),  # Li & Liang's reparameterisation
}
BASES = ("plain", "nf4")
MODES = ("ddp", "fsdp")
# Note: no reparameterised prefix under FSDP2. Its shared MLP lives in the first attention
# layer and is read by every layer, but FSDP2 reshards a layer's parameters after that layer's
# own forward; the other layers then raise a clear error (PrefixLayer.prefix) instead.
FSDP_CONFIGS = [c for c in CONFIGS if c != "prefix-mlp"]
CASES = [(mode, config, base) for mode in MODES for config in CONFIGS for base in BASES
         if mode == "ddp" or config in FSDP_CONFIGS]
# LoRA on a Mixtral's experts, 3-D parameters (LoraConfig.parameters), on its own base
MOE = LoraConfig(r=4, alpha=8, targets=("q_proj",), parameters=("experts.gate_up_proj", "experts.down_proj"))
CASES += [(mode, "experts", "moe") for mode in MODES]
CASES += [(mode, "experts", "moe-nf4") for mode in MODES]  # the experts themselves in 4 bits (NF4Config.parameters)
CASES += [(mode, "experts", "gpt_oss-nf4") for mode in MODES]  # 4-bit experts stored (E, in, out), with biases
CODEC = ("packed", "absmax", "nested_absmax")  # Linear4bit's sharded storage (Note: frozen integer parameters)


def savable(config) -> bool:
    """Configs lowrank.save_adapter writes today (PEFT's LoRA format); widen as io learns more."""
    return isinstance(config, (LoraConfig, PromptConfig, PrefixConfig))


def case_name(mode: str, config: str, base: str) -> str:
    return f"{mode}-{config}-{base}"


def base_model(base: str):
    build = models.mixtral if base.startswith("moe") else models.gpt_oss if base.startswith("gpt_oss") else models.llama
    model = build()  # seeded: every rank and the reference alike
    if base == "nf4":
        quantize(model, NF4Config())
    if base in ("moe-nf4", "gpt_oss-nf4"):
        quantize(model, NF4Config(parameters=MOE.parameters))
    return model


def build(config: str, base: str):
    model = base_model(base)
    torch.manual_seed(1)  # the adapters' own initialisation
    inject(model, MOE if config == "experts" else CONFIGS[config])
    return model


def batch(rank: int) -> torch.Tensor:
    ids = models.ids(batch=WORLD * PER_RANK, seq=8, seed=1)  # (WORLD * PER_RANK, 8), the global batch
    return ids[rank * PER_RANK:(rank + 1) * PER_RANK]  # (PER_RANK, 8)


def loss(model, rank: int) -> torch.Tensor:
    x = batch(rank)
    return model(input_ids=x, labels=x).loss


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # See Note: one thread
    try:
        yield
    finally:
        torch.set_num_threads(before)


def adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def adamw_8bit(params):
    """8-bit states for every tensor (the tiny model's adapters are below the default threshold)."""
    return AdamW8bit(params, lr=LR, min_8bit_size=0)


def train_single(config: str, base: str, optimizer=adamw):
    """The single-process reference (Note: the same arithmetic as one process)."""
    with one_thread():
        model = build(config, base)
        opt = optimizer(model.parameters())
        for _ in range(STEPS):
            for rank in range(WORLD):
                (loss(model, rank) / WORLD).backward()
            opt.step()
            opt.zero_grad()
    return model


def shard(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # one FSDP group per decoder layer, then the rest at the root
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None:  # a MoE layer: the experts (with their LoRA layers around them) a group of their own
            fully_shard(experts, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# -- what each rank runs ------------------------------------------------------------------
def run_case(rank: int, mode: str, config: str, base: str, out: str, mesh) -> dict:
    model = build(config, base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mode == "ddp":
        trained = DistributedDataParallel(model)
    else:
        shard(model, mesh)
        trained = model
    opt = torch.optim.AdamW(trained.parameters(), lr=LR)  # every parameter, frozen ones included
    for _ in range(STEPS):
        loss(trained, rank).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    result = {
        "trained": {n: full_tensor(p.detach()).clone() for n, p in params.items() if p.requires_grad},
        "unchanged": [n for n, t in before.items() if torch.equal(full_tensor(params[n].detach()), t)],
        "frozen_flags": [n for n, p in params.items() if not p.requires_grad and p.grad is not None],
        "with_state": sorted(names[id(p)] for p in opt.state),
        "summary": tuple(vars(summary(model)).values()),
    }
    if mode == "fsdp":
        result["shards"] = {n: (type(p).__name__, p.numel(), p.to_local().numel()) for n, p in params.items()}
        try:
            inject(model, LoraConfig(r=2), "late")
        except RuntimeError as e:
            result["late_inject"] = str(e)
    if savable(MOE if config == "experts" else CONFIGS[config]):
        result |= save_and_load(rank, mode, config, base, model, out, mesh)
    return result


def train_ddp_8bit(rank: int) -> dict:
    """LoRA on the 4-bit base under DDP with lowrank.AdamW8bit: each rank updates its copy from the
    averaged gradients, so its adapters must equal the one-process run with the same optimizer."""
    model = build("lora", "nf4")
    trained = DistributedDataParallel(model)
    opt = adamw_8bit(trained.parameters())
    for _ in range(STEPS):
        loss(trained, rank).backward()
        opt.step()
        opt.zero_grad()
    return {"trained": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "state_dtypes": sorted({str(s["state1"].dtype) for s in opt.state.values()})}


def save_and_load(rank, mode, config, base, model, out, mesh) -> dict:
    name = case_name(mode, config, base)
    saved = os.path.join(out, name)
    if mode == "ddp":  # the usual DDP pattern: rank 0 alone saves; a call on another rank writes nothing
        save_adapter(model, saved if rank == 0 else saved + f"-rank{rank}")
        return {"saved": saved, "rank_wrote": os.path.exists(saved + f"-rank{rank}")}
    from torch.distributed.tensor import DTensor

    gathered, real = [], DTensor.full_tensor

    def counted(self, *args, **kwargs):  # every all-gather save_adapter asks for
        gathered.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    DTensor.full_tensor = counted
    try:
        save_adapter(model, saved)  # FSDP: a collective, every rank calls it
    finally:
        DTensor.full_tensor = real
    result = {"saved": saved, "seen_after_save": os.path.isfile(os.path.join(saved, "adapter_model.safetensors")),
              "gathered": gathered}
    blocker = os.path.join(out, name + "-a-file")  # a path that is a file: rank 0's write fails
    if rank == 0:
        open(blocker, "w").close()
    torch.distributed.barrier()
    try:
        save_adapter(model, blocker)
    except Exception as e:
        result["failed_save"] = f"{type(e).__name__}: {e}"
    fresh = base_model(base)
    load_adapter(fresh, saved)  # every rank reads the directory, before fully_shard
    shard(fresh, mesh)
    x = batch(rank)
    with torch.no_grad():
        result["loaded_local"] = {n: p.to_local().clone() for n, p in fresh.named_parameters() if p.requires_grad}
        result["loaded_logits_equal"] = torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    return result


def mixed_precision_keeps_the_codec(mesh) -> list[str]:
    """Under MixedPrecisionPolicy(param_dtype=bfloat16) FSDP2 gathers floating parameters in
    bfloat16; the 4-bit fields must come back with their own dtype and bits (Note: frozen
    integer parameters). Returns the fields that did not."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = base_model("nf4")
    before = {n: t.clone() for n, t in model.named_parameters() if n.rsplit(".", 1)[-1] in CODEC}
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    model.unshard()  # the parameters forward would see
    seen = {n: t for n, t in model.named_parameters() if n in before}
    wrong = [n for n, t in before.items() if seen[n].dtype != t.dtype or not torch.equal(seen[n], t)]
    if model.model.embed_tokens.weight.dtype != torch.bfloat16:  # the policy did act on floating parameters
        wrong.append("model.model.embed_tokens.weight was not gathered in bfloat16")
    model.reshard()
    return wrong


def worker(rank: int, world: int, out: str) -> None:
    """Every case in CASES on this rank; writes {case: result or {"error": traceback}} to out/rank<r>.pt."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    try:
        results["mixed-precision"] = {"wrong": mixed_precision_keeps_the_codec(mesh)}
    except Exception:
        results["mixed-precision"] = {"error": traceback.format_exc()}
    for mode, config, base in CASES:
        try:
            results[case_name(mode, config, base)] = run_case(rank, mode, config, base, out, mesh)
        except Exception:
            results[case_name(mode, config, base)] = {"error": traceback.format_exc()}
    try:
        results["ddp-lora-nf4-adamw8bit"] = train_ddp_8bit(rank)
    except Exception:
        results["ddp-lora-nf4-adamw8bit"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
