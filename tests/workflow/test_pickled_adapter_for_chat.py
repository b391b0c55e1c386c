"""`lowrank chat` / `lowrank web` with an adapter saved only as a pickled adapter_model.bin (older
PEFT): --allow-pickle passes load_adapter's allow_pickle (lowrank merge had it; chat and web had no
way to load such an adapter at all)."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from lowrank.commands import web  # noqa: E402
from lowrank.workflow.model import load_with_adapter  # noqa: E402
from tests.io.export_helpers import saved_base, tokenizer  # noqa: E402
from tests.tuners import models  # noqa: E402


def test_chat_loads_a_pickled_adapter_with_allow_pickle(tmp_path):
    base = saved_base("llama", tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle file"):
        load_with_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"))
    model, _, _ = load_with_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), allow_pickle=True)
    x = torch.randint(0, base.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, theirs.eval()(x).logits, rtol=0, atol=1e-5)


def test_web_passes_allow_pickle_to_its_page(tmp_path, monkeypatch):
    saved_base("llama", tmp_path / "base")
    served = []
    monkeypatch.setattr(web, "_serve", lambda cmd: served.append(cmd) or 0)
    parser = __import__("argparse").ArgumentParser()
    web.add_parser(parser.add_subparsers())
    args = parser.parse_args(["web", str(tmp_path / "base"), "--allow-pickle"])
    assert web.run(args) == 0
    assert "--allow-pickle" in served[0][served[0].index("--") + 1:]  # the page's own options (web_app.py runs on import)
