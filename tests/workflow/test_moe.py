"""LoRA on a mixture of experts' 3-D parameters through `lowrank train` (method_options'
`parameters`): a tiny Mixtral trains, its checkpoint loads back, `lowrank merge` writes W'."""

import copy
import math

import pytest
import torch

from lowrank.quant.params4bit import Weight4bit
from lowrank.tuners.base import innermost
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
        assert done.returncode != 0 and "trains on an unquantized base" in done.stderr
    merged, _ = load_base(str(tmp_path / "merged"))
    ref_model = copy.deepcopy(trained_model).double()
    ref_model.config._experts_implementation = "eager"  # transformers' default (grouped_mm) takes no float64
    with torch.no_grad():
        got, ref = merged(input_ids=x).logits, ref_model(input_ids=x).logits
    # W0 + s B A formed two ways (in the forward, and merged) rounds differently: both within a
    # few times the adapted float32 model's own error against float64
    tol = max(4 * (want - ref).abs().max().item(), 64 * torch.finfo(torch.float32).eps * ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol
