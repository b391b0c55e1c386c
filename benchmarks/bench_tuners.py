"""LoRA training-step and merged-inference speed on this machine: lowrank against PEFT on
the same model with the same weights, in one run.

    python benchmarks/bench_tuners.py            # a small Llama (hidden 256, 4 layers), batch 4 x 128
    python benchmarks/bench_tuners.py --quick    # tiny shapes, a smoke run

Rows (median and 20/80 quantiles in ms):
    train_step        forward + backward + AdamW step of LoRA (r=16, every linear but the head);
                      providers lowrank, peft; ratio = lowrank / peft (goal <= 1)
    experts_step      the same step for LoRA on a Mixtral's experts (8 experts, top 2; LoRA on the
                      3-D experts.gate_up_proj / down_proj only: LoraConfig.parameters, PEFT's
                      target_parameters); ratio = lowrank / peft
    merged_inference  forward under no_grad after lowrank.merge, against the plain base model;
                      ratio = merged / base (goal <= 1.02)
Measurements of the two providers alternate call by call, so a shared machine's drift hits both.
Prints a markdown table; writes JSON rows with the machine, versions and date to
benchmarks/results/tuners.json (+ .md, git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

from lowrank.config import LoraConfig  # noqa: E402
from lowrank.inject import inject, merge  # noqa: E402

FULL = dict(hidden=256, layers=4, batch=4, seq=128, reps=15)
QUICK = dict(hidden=64, layers=2, batch=2, seq=16, reps=3)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(hidden: int, layers: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                                   num_key_value_heads=max(hidden // 64, 2), max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg)


def mixtral(hidden: int, layers: int, experts: int = 8, top_k: int = 2) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 7 // 4,
                                     num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                                     num_key_value_heads=max(hidden // 64, 2), max_position_embeddings=512,
                                     num_local_experts=experts, num_experts_per_tok=top_k)
    return transformers.MixtralForCausalLM(cfg)


def twins(base, ours_config: LoraConfig, theirs_config):
    """(lowrank model, PEFT model): `base` with the same LoRA weights in both."""
    import peft

    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, ours_config)
    peft.inject_adapter_in_model(theirs_config, theirs)
    for name, p in theirs.named_parameters():  # PEFT leaves the rest trainable when injected directly
        p.requires_grad_("lora_" in name)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():  # the same adapter weights in both
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs_params[name.replace(".base.", ".base_layer.")].copy_(p)
    return ours, theirs


def alternate(fns: dict, reps: int) -> dict[str, tuple[float, float, float]]:
    """Time each fn `reps` times, taking turns; one warm-up call each first."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: _common.summarize([1e3 * t for t in ts]) for name, ts in times.items()}


def train_step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tuners.json")
    args = parser.parse_args(argv)
    import peft

    shape = QUICK if args.quick else FULL
    base = llama(shape["hidden"], shape["layers"]).train()
    ids = torch.randint(0, 1024, (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    ours, theirs = twins(base, LoraConfig(r=16, alpha=32, targets=TARGETS),
                         peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    rows = []
    shape_name = f"llama h{shape['hidden']} L{shape['layers']} b{shape['batch']}x{shape['seq']}"
    rtol = _common.RTOL_STEP[torch.float32]  # Note: a model's output and its adapters' gradients (_common)
    _common.check_same_model("train_step", {"lowrank": ours, "peft": theirs}, ids, [("lowrank", "peft")], rtol)
    step = alternate({"lowrank": train_step(ours, ids), "peft": train_step(theirs, ids)}, shape["reps"])
    for provider, (ms, p20, p80) in step.items():
        rows.append({"case": "train_step", "shape": shape_name, "provider": provider, "ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "ratio": ms / step["peft"][0], "ratio_vs": "peft"})

    experts = ["experts.gate_up_proj", "experts.down_proj"]
    moe = mixtral(shape["hidden"], shape["layers"]).train()
    ours_moe, theirs_moe = twins(moe, LoraConfig(r=16, alpha=32, targets=None, parameters=experts),
                                 peft.LoraConfig(r=16, lora_alpha=32, target_parameters=experts))
    moe_name = f"mixtral h{shape['hidden']} L{shape['layers']} E8 b{shape['batch']}x{shape['seq']}"
    _common.check_same_model("experts_step", {"lowrank": ours_moe, "peft": theirs_moe}, ids, [("lowrank", "peft")], rtol)
    step = alternate({"lowrank": train_step(ours_moe, ids), "peft": train_step(theirs_moe, ids)}, shape["reps"])
    for provider, (ms, p20, p80) in step.items():
        rows.append({"case": "experts_step", "shape": moe_name, "provider": provider, "ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "ratio": ms / step["peft"][0], "ratio_vs": "peft"})
    del ours_moe, theirs_moe, moe

    ours.eval(), base.eval()
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        merge(ours)  # the merged model must compute what the adapted one did
        _common.check_close("merged_inference: the merged model's logits against the adapted model's",
                            ours(input_ids=ids).logits, adapted, rtol)

    def infer(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    inf = alternate({"lowrank-merged": infer(ours), "base": infer(base)}, 2 * shape["reps"])
    for provider, (ms, p20, p80) in inf.items():
        rows.append({"case": "merged_inference", "shape": shape_name, "provider": provider, "ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "ratio": ms / inf["base"][0], "ratio_vs": "base"})

    cols = ["case", "shape", "provider", "ms", "p20_ms", "p80_ms", "ratio", "ratio_vs"]
    table = _common.markdown(rows, cols)
    env = _common.environment(torch.device("cpu"))
    _common.write(args.out, rows, env, table)
    print(f"{env}\n\n{table}\n\nwrote {args.out} (+ .md)")
    return rows


if __name__ == "__main__":
    main()
