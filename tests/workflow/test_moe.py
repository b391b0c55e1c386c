"""LoRA on a mixture of experts' 3-D parameters through `lowrank train` (method_options'
`parameters`): a tiny Mixtral trains, its checkpoint loads back, `lowrank merge` writes W'."""

import copy
import shutil
import math

import pytest
import torch

from lowrank.export import merged_weight
from lowrank.quant.params4bit import Weight4bit
from lowrank.tuners.base import innermost
from lowrank.tuners.lora_param import lora_chain
from lowrank.workflow.methods import load_trainable
from lowrank.workflow.model import apply_method, load_base, load_with_adapter
from lowrank.workflow.train import STATE_FILE, train

from . import tiny
from .conftest import lowrank as run
from .test_e2e import _config

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("method, nf4", [("lora", {}), ("qlora", {}), ("qlora", {"parameters": EXPERTS})],
                         ids=["lora", "qlora", "qlora-4bit-experts"])
def test_lora_on_moe_experts_trains_merges_and_loads_back(tmp_path, data_file, method, nf4):
    """A Mixtral with LoRA on its experts' 3-D parameters (method_options' `parameters`) besides
    its linear layers, the experts themselves in 4 bits too with `nf4: {parameters: ...}`:
    trained, the checkpoint loads back to the same outputs, and the merged model computes what
    the adapted one did."""
    model_dir = tiny.build(tmp_path / "mixtral", arch="mixtral")
    options = {"r": 4, "parameters": EXPERTS}
    summary = train(_config(tmp_path, model_dir, data_file, method=method, method_options=options, epochs=1, lr=5e-2,
                            nf4=nf4))
    assert math.isfinite(summary.loss)
    trained_model, tok = load_base(str(model_dir))
    apply_method(trained_model, method, options, nf4)
    experts = innermost(trained_model.model.layers[0].mlp.experts)  # inside the LoRA layers
    assert isinstance(experts._modules.get("down_proj"), Weight4bit) == bool(nf4)
    saved = torch.load(f"{summary.checkpoint}/{STATE_FILE}", weights_only=True)["trainable"]
    assert any(".experts." in k for k in saved) and load_trainable(trained_model, saved) == ([], [])
    loaded, _, _ = load_with_adapter(str(model_dir), summary.checkpoint)
    if method == "qlora":  # chat in bf16 of a float32 run: the trained codes, the rest as from_pretrained(bf16) has it
        chat = load_with_adapter(str(model_dir), summary.checkpoint, dtype="bfloat16")[0]
        codes = {k: v for k, v in trained_model.state_dict().items() if v.dtype in (torch.uint8, torch.int32)}
        assert codes and all(torch.equal(chat.state_dict()[k], v) for k, v in codes.items())
        plain = load_base(str(model_dir), "bfloat16")[0]
        want = {k: t.dtype for k, t in [*plain.named_parameters(), *plain.named_buffers()]}
        got = {k: t.dtype for k, t in [*chat.named_parameters(), *chat.named_buffers()] if k in want}
        assert got and got == {k: want[k] for k in got}
    base, _ = load_base(str(model_dir))
    x = torch.tensor([tok("Status of the reactor? Stable")["input_ids"]])
    with torch.no_grad():
        want = trained_model.eval()(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=0, atol=0)  # same tensors, same ops
        assert not torch.allclose(base(input_ids=x).logits, want)

    # merged: W' written dense, read back by transformers; a qlora adapter --as-trained, at the NF4
    # weights it was trained against (the base quantized again, as training did)
    run("merge", model_dir, summary.checkpoint, tmp_path / "merged", *(["--as-trained"] if method == "qlora" else []))
    if method == "lora":
        done = run("merge", model_dir, summary.checkpoint, tmp_path / "x", "--as-trained", check=False)
        assert done.returncode != 0 and "on an unquantized base" in done.stderr
    merged, _ = load_base(str(tmp_path / "merged"))
    ref_model = copy.deepcopy(trained_model).double()
    ref_model.config._experts_implementation = "eager"  # transformers' default (grouped_mm) takes no float64
    with torch.no_grad():
        got, ref = merged(input_ids=x).logits, ref_model(input_ids=x).logits
    # W0 + s B A formed two ways (in the forward, and merged) rounds differently: both within a
    # few times the adapted float32 model's own error against float64
    tol = max(4 * (want - ref).abs().max().item(), 64 * torch.finfo(torch.float32).eps * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol


def test_a_bf16_qlora_adapter_chats_and_merges_as_trained(tmp_path, data_file):
    """Trained in bf16 on 4-bit experts: `lowrank chat` (load_with_adapter, float32 by default)
    quantizes the bf16 weights again, so its NF4 codes are the trained ones; `merge --as-trained`
    lands nearer the adapted model than a merge into the full-precision base; what it cannot
    read its options from is refused."""
    model_dir = tiny.build(tmp_path / "mixtral", arch="mixtral")
    options, nf4 = {"r": 4, "parameters": EXPERTS}, {"parameters": EXPERTS}
    summary = train(_config(tmp_path, model_dir, data_file, method="qlora", method_options=options, epochs=1,
                            lr=5e-2, nf4=nf4, dtype="bfloat16"))
    trained, _ = load_base(str(model_dir), "bfloat16")
    apply_method(trained, "qlora", options, nf4)
    saved = torch.load(f"{summary.checkpoint}/{STATE_FILE}", weights_only=True)["trainable"]
    assert load_trainable(trained, saved) == ([], [])
    chat, _, _ = load_with_adapter(str(model_dir), summary.checkpoint)  # dtype float32
    codes = {k: v for k, v in trained.state_dict().items() if ".experts." in k and "lora_" not in k}
    assert all(torch.equal(chat.state_dict()[k], v) for k, v in codes.items())
    # the rest as from_pretrained gives it in chat's float32: parameters, buffers (rotary tables) alike
    dense = dict(load_base(str(model_dir))[0].named_buffers()) | dict(load_base(str(model_dir))[0].named_parameters())
    rest = dict(chat.named_buffers()) | {k: p for k, p in chat.named_parameters() if "lora_" not in k}
    shared = [k for k in rest if k in dense]
    assert shared and all(rest[k].dtype == dense[k].dtype == torch.float32 for k in shared)
    run("merge", model_dir, summary.checkpoint, tmp_path / "as", "--as-trained", "--dtype", "fp32")
    run("merge", model_dir, summary.checkpoint, tmp_path / "plain", "--dtype", "fp32")
    # the merged experts: dequant(W_nf4) + s B A in float32, as lowrank.export forms it from the trained model
    layer = next(la for la in lora_chain(trained.model.layers[0].mlp.experts) if la.parameter_name == "down_proj")
    want = merged_weight(layer)
    key = "model.layers.0.mlp.experts.down_proj"
    as_trained, plain = (load_base(str(tmp_path / d))[0].state_dict()[key] for d in ("as", "plain"))
    assert torch.equal(as_trained, want)
    assert not torch.allclose(plain, want, rtol=0, atol=1e-3)  # the full-precision base: off by the NF4 rounding
    no_file = tmp_path / "peft-only"
    shutil.copytree(summary.checkpoint, no_file)
    (no_file / "lowrank_workflow.json").unlink()
    done = run("merge", model_dir, no_file, tmp_path / "x", "--as-trained", check=False)
    assert done.returncode != 0 and "has none (a hub id" in done.stderr
