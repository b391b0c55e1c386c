"""save_adapter / load_adapter against PEFT 0.21 (the oracle), both ways, on tiny Llama and
GPT-2 (Conv1D) models built from config. Outputs must be EQUAL: see Note: why equality is
exact, in tests/peers/test_peft_lora.py (the same float32 ops in the same order)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowrank  # noqa: E402
from lowrank import io as lio  # noqa: E402
from lowrank.config import LoraConfig  # noqa: E402
from lowrank.inject import adapter_names, inject  # noqa: E402
from tests.tuners import models  # noqa: E402

MODELS = {"llama": (models.llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (models.gpt2, ["c_attn", "c_proj"])}
VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
PEFT_VARIANT = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def logits(model):
    with torch.no_grad():
        return models.run(model.eval(), models.ids())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", MODELS)
def test_ours_to_peft(kind, variant, tmp_path):
    make, targets = MODELS[kind]
    base = make().eval()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, targets=targets, **VARIANTS[variant]))
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(logits(theirs), logits(ours))
    assert not torch.equal(logits(base), logits(ours))  # the adapter does something


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", MODELS)
def test_peft_to_ours(kind, variant, tmp_path):
    make, targets = MODELS[kind]
    base = make().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       **PEFT_VARIANT[variant]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    result = lio.load_adapter(ours, tmp_path / "p")
    assert result.missing == result.unexpected == result.mismatched == []
    assert adapter_names(ours) == ["default"]
    assert torch.equal(logits(ours), logits(theirs))


def test_an_adapter_with_dropout_loads_into_an_eval_model_in_eval_mode(tmp_path):
    """A PEFT adapter with lora_dropout 0.1 loaded into a model in eval mode: its dropout is off,
    as after PEFT's from_pretrained: outputs equal PEFT's, call after call (the new modules
    started in training mode before: lowrank/inject.py, Note: train or eval mode)."""
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    lio.load_adapter(ours, tmp_path / "p")
    assert not any(m.training for m in ours.modules())
    with torch.no_grad():
        want = models.run(loaded, models.ids())
        assert torch.equal(models.run(ours, models.ids()), want) and torch.equal(models.run(ours, models.ids()), want)


def test_base_weights_of_tied_or_unwrapped_modules_load_as_peft_loads_them(tmp_path):
    """PEFT saves a targeted head's or embedding's own weight as `<module>.base_layer.weight`
    (Note: base weights in an adapter file, lowrank/io.py), also into an adapter that does not
    target it (the model's other adapter does), and for GPT-2's lm_head, which is tied to wte.
    Both were refused as unexpected keys; now they load, and the outputs equal PEFT's."""
    cases = [(models.gpt2, [("default", ["lm_head"])]),
             (models.llama, [("default", ["q_proj", "embed_tokens"]), ("b", ["lm_head"])])]
    for make, adapters in cases:
        base = make().eval()
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=adapters[0][1]))
        for name, targets in adapters[1:]:
            theirs.add_adapter(name, peft.LoraConfig(r=2, target_modules=targets))
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        theirs.save_pretrained(str(tmp_path / make.__name__))
        theirs.set_adapter("default")
        saved = safetensors_torch.load_file(tmp_path / make.__name__ / "adapter_model.safetensors")
        assert "base_model.model.lm_head.base_layer.weight" in saved  # what was refused
        ours = copy.deepcopy(base)
        result = lio.load_adapter(ours, tmp_path / make.__name__)
        assert "base_model.model.lm_head.base_layer.weight" in result.base and result.unexpected == []
        with torch.no_grad():
            assert torch.equal(models.run(ours, models.ids()), models.run(theirs.eval(), models.ids())), make.__name__


@pytest.mark.parametrize("config, targets, rank_pattern", [
    (LoraConfig(r=3, targets="re:0"), "(?:0)", {}),
    (LoraConfig(r=3, targets="all-linear", rank_pattern={"re:0": 2}), ["0", "2"], {"^0": 2}),
], ids=["target", "rank_pattern"])
def test_a_name_that_is_the_suffix_of_another_saves_unambiguously(tmp_path, config, targets, rank_pattern):
    """Module "0" is the `.`-suffix of "1.0" (nested nn.Sequential): a list entry "0" or a pattern
    key "0" would also pick "1.0" when PEFT or lowrank reads the file, so the file names them by
    a regular expression and an anchored key; both load it back equal."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                                                              torch.nn.Linear(8, 8))).eval()
    ours = build()
    inject(ours, config)
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_modules"] == targets and saved["rank_pattern"] == rank_pattern
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    again = build()
    lio.load_adapter(again, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(again(x), ours(x)) and torch.equal(theirs(x), ours(x))


def test_what_lowrank_cannot_inject_is_named_with_the_file(tmp_path):
    """PEFT puts DoRA on grouped convolutions (with other norms); lowrank refuses it there: the error
    names the file, and nothing is left behind."""
    base = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Conv1d(4, 4, 3, groups=2)).eval()  # the linear goes first
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: cannot load this adapter: DoRA on a grouped "
                                         r"convolution is not supported: '1' is a Conv1d with groups=2"):
        lio.load_adapter(ours, tmp_path / "p")
    assert adapter_names(ours) == [] and ours.state_dict().keys() == base.state_dict().keys()


def test_load_into_a_merged_model_raises_and_changes_nothing(tmp_path):
    model = models.llama()
    inject(model, LoraConfig(r=2, targets="q_proj"), "a")
    models.randomize_adapters(model)
    lio.save_adapter(model, tmp_path / "a")
    lowrank.merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="needs unmerged adapters; call lowrank.unmerge"):
        lio.load_adapter(model, tmp_path / "a", name="b")
    assert adapter_names(model) == ["a"] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_patterns_round_trip_through_peft(tmp_path):
    """Per-module r and alpha (rank_pattern / alpha_pattern) survive ours -> PEFT -> ours."""
    base = models.llama().eval()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2},
                            alpha_pattern={"v_proj": 3.0}))
    models.randomize_adapters(ours)
    lio.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(logits(theirs), logits(ours))
    again = copy.deepcopy(base)
    lio.load_adapter(again, tmp_path / "a")
    assert torch.equal(logits(again), logits(ours))


def test_saved_keys_and_config(tmp_path):
    model = models.gpt2()
    inject(model, LoraConfig(r=4, alpha=8, targets=["c_attn"], dora=True))
    lio.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.transformer.h.{i}.attn.c_attn.{s}" for i in range(2)
                    for s in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["use_dora"] is True  # GPT2LMHeadModel
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == 8 and cfg["r"] == 4 and cfg["fan_in_fan_out"] is True
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "a")).use_dora  # PEFT's own reader accepts it


def _saved(tmp_path):
    model = models.llama()
    inject(model, LoraConfig(r=2, targets=["q_proj"]))
    models.randomize_adapters(model)
    lio.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file_is_named(tmp_path, damage):
    path = _saved(tmp_path)
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    model = models.llama()
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        lio.load_adapter(model, path)
    assert adapter_names(model) == []  # nothing left behind


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("peft_type", "IA3", ValueError, "peft_type is 'IA3'"),  # another method (PREFIX_TUNING loads: io_prefix)
        ("init_lora_weights", "pissa", NotImplementedError, "init_lora_weights='pissa'"),  # rewrites the base
        # each field as LoraConfig checks it, the file named (r 4.7 was cut to 4, "false" read as rsLoRA)
        ("r", 4.7, ValueError, r"adapter_config.json: not a LoRA config .* r \(the LoRA rank\) .* got 4.7"),
        ("use_rslora", "false", ValueError, "adapter_config.json: .* rslora must be a bool .* got 'false'"),
        ("lora_alpha", 1e400, ValueError, "alpha must be a finite number > 0; got inf"),
        ("lora_dropout", "x", ValueError, "adapter_config.json: .* dropout must be in"),
        ("target_modules", [0], ValueError, "target_modules / exclude_modules must be a string or a list of strings"),
        ("rank_pattern", ["q_proj"], ValueError, "rank_pattern must be a JSON object"),
    ],
)
def test_refuses_a_config_it_cannot_honour(tmp_path, field, value, error, message):
    path = _saved(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(error, match=message):
        lio.load_adapter(models.llama(), path)


def test_pickle_needs_opt_in(tmp_path):
    path = _saved(tmp_path)
    sd = safetensors_torch.load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(sd, path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin.*allow_pickle=True"):
        lio.load_adapter(models.llama(), path)
    lio.load_adapter(models.llama(), path, allow_pickle=True)


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    path = _saved(tmp_path)
    f = path / "adapter_model.safetensors"
    sd = safetensors_torch.load_file(f)
    gone = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    sd.pop(gone)
    sd["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 32)
    safetensors_torch.save_file(sd, f)
    model = models.llama()
    with pytest.raises(ValueError, match="missing keys.*layers.1.self_attn.q_proj.lora_A.*unexpected.*k_proj"):
        lio.load_adapter(model, path)
    assert adapter_names(model) == []
    result = lio.load_adapter(model, path, strict=False)
    assert result.missing == [gone] and result.unexpected == ["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    sd = safetensors_torch.load_file(_saved(tmp_path / "b") / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd[key] = torch.zeros(32, 3)
    safetensors_torch.save_file(sd, tmp_path / "b" / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatches.*q_proj\.lora_B\.weight.*\(32, 3\).*\(32, 2\)"):
        lio.load_adapter(models.llama(), tmp_path / "b" / "a", strict=False)


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model = models.llama()
    inject(model, LoraConfig(r=3, targets=["v_proj"]))

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lio.save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temporary files left either
    with pytest.raises(OSError):
        lio.save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_needs_a_name_when_ambiguous(tmp_path):
    model = models.llama()
    inject(model, LoraConfig(r=2, targets=["q_proj"]), name="x")
    inject(model, LoraConfig(r=2, targets=["v_proj"]), name="y")
    with pytest.raises(ValueError, match="pass name="):
        lio.save_adapter(model, tmp_path / "a")
    lio.save_adapter(model, tmp_path / "a", name="y")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]


def test_peft_regex_targets_exclude_and_embedding(tmp_path):
    """PEFT's target_modules as one regex string, exclude_modules as a list, and LoRA on the
    embedding (lora_embedding_A / _B keys)."""
    base = models.llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*(embed_tokens|q_proj|v_proj)", exclude_modules=["layers.1.self_attn.q_proj"]))
    models.randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    result = lio.load_adapter(ours, tmp_path / "p")
    assert sorted(result.modules) == ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
                                      "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert result.base == ["base_model.model.model.embed_tokens.base_layer.weight"]  # PEFT saves it; we load it
    assert torch.equal(logits(ours), logits(theirs))
    lio.save_adapter(ours, tmp_path / "a")  # and back: the embedding's keys are PEFT's
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in safetensors_torch.load_file(
        tmp_path / "a" / "adapter_model.safetensors")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    assert torch.equal(logits(again), logits(ours))


def test_load_into_a_model_without_those_modules(tmp_path):
    path = _saved(tmp_path)  # Llama's q_proj
    model = models.gpt2()
    with pytest.raises(ValueError, match="no module of GPT2LMHeadModel matched"):
        lio.load_adapter(model, path)
    assert adapter_names(model) == []


KILLED_SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from lowrank.io import save_adapter
from lowrank.inject import inject
from lowrank.config import LoraConfig
from lowrank.inject import eject
model = torch.nn.Sequential(torch.nn.Linear(256, 256))
print("ready", flush=True)
i = 0
while True:
    i += 1
    inject(model, LoraConfig(r=64, alpha=float(i), targets=["0"]))  # each save: another config and weights
    with torch.no_grad():
        model[0].lora_B["default"].weight.fill_(float(i))
    save_adapter(model, {path!r})
    eject(model)
"""


def test_killed_save_leaves_a_whole_adapter(tmp_path):
    """SIGKILL a process that saves over and over, each time another config (alpha = i) with
    other weights (B = i): the directory always holds one save's config and weights together,
    and the files it held besides the adapter's."""
    import pathlib
    import subprocess
    import sys
    import time

    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    inject(model, LoraConfig(r=64, alpha=1000.0, targets=["0"]))
    with torch.no_grad():
        model[0].lora_B["default"].weight.fill_(1000.0)
    lio.save_adapter(model, tmp_path / "a")  # the "previous" adapter: alpha = B = 1000
    (tmp_path / "a" / "README.md").write_text("notes")
    root = str(pathlib.Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER.format(root=root, path=str(tmp_path / "a"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 256))
    lio.load_adapter(fresh, tmp_path / "a")
    b = fresh[0].lora_B["default"].weight
    assert torch.equal(b, torch.full_like(b, b[0, 0].item()))  # one save's values, not a mix
    alpha = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_alpha"]
    assert alpha == b[0, 0].item()  # and that save's config
    assert (tmp_path / "a" / "README.md").read_text() == "notes"


def test_a_causal_lm_adapter_loads_with_peft_auto_class(tmp_path):
    """task_type CAUSAL_LM for a causal LM: PEFT's AutoPeftModelForCausalLM needs it (it refused
    the file: "Cannot infer the auto class"); it then loads the base from base_model_name_or_path."""
    from tests.io.export_helpers import saved_base

    model = saved_base("llama", tmp_path / "base")  # LlamaForCausalLM, config._name_or_path the directory
    inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    models.randomize_adapters(model)
    lio.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    ids = models.ids(batch=2, seq=6)
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, model(input_ids=ids).logits)
