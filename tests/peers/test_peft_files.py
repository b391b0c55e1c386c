"""LoRA adapter files at the edges of PEFT 0.21's format, both ways: an adapter on parameters
alone, a classifier's head (modules_to_save), pattern keys that are no regular expressions of
themselves, inits that leave the base alone, and the variants lowrank refuses by their field.
Each is a problem a review found; PEFT is the oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowrank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert_classifier() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def nudge(model: nn.Module, which=lambda n, p: p.requires_grad) -> None:
    """A stand-in for training: every chosen parameter moved off its start."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if which(n, p):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


def test_an_adapter_on_parameters_alone_says_no_target_modules_and_loads_in_peft(tmp_path):
    """None would be PEFT's "this model type's default targets" (q_proj, v_proj): it then wraps the
    module whose weight is adapted too, and refuses."""
    base = llama()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=2, targets=None, parameters=["q_proj.weight"]))
    nudge(ours)
    lowrank.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_modules"] == [] and saved["target_parameters"] == ["q_proj.weight"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(theirs(IDS).logits, ours(IDS).logits)


def test_a_classifiers_head_goes_into_the_file_and_comes_back_in_peft_and_lowrank(tmp_path):
    base = bert_classifier()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=4, targets=["query", "value"]))
    ours.classifier.requires_grad_(True)  # a new task's head trains with the adapter
    nudge(ours)
    lowrank.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier", "score"]
    with torch.no_grad():
        want = ours(input_ids=IDS).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
        assert torch.equal(theirs(input_ids=IDS).logits, want)
        back = copy.deepcopy(base)
        result = lowrank.load_adapter(back, tmp_path / "a")
        assert result.base == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
        assert torch.equal(back(input_ids=IDS).logits, want)


def test_peft_files_of_a_classifier_load_with_their_head_and_a_missing_head_is_named(tmp_path):
    base = bert_classifier()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    nudge(pm, lambda n, p: "lora_" in n or "modules_to_save" in n)
    pm.save_pretrained(tmp_path / "a")
    ours = copy.deepcopy(base)
    lowrank.load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, pm(input_ids=IDS).logits)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del weights["base_model.model.classifier.weight"]
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"missing keys: \['base_model.model.classifier.weight'\]"):
        lowrank.load_adapter(fresh, tmp_path / "a")
    assert lowrank.adapter_names(fresh) == []


def test_mica_leaves_the_base_alone_and_loads(tmp_path):
    base = llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    nudge(pm, lambda n, p: "lora_" in n)
    pm.save_pretrained(tmp_path / "a")
    ours = copy.deepcopy(base)
    lowrank.load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, pm(IDS).logits)


@pytest.mark.parametrize("field, value", [("kasa_config", {"beta": 1e-4, "gamma": 1e-3}), ("ensure_weight_tying", True),
                                          ("arrow_config", {"top_k": 2}), ("monteclora_config", {"mc_samples": 2})])
def test_variants_lowrank_does_not_compute_are_refused_by_their_field(field, value, tmp_path):
    model = llama()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["q_proj"]))
    lowrank.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {field: value}))
    fresh = llama()
    with pytest.raises(NotImplementedError, match=rf"adapter_config.json: {field}="):
        lowrank.load_adapter(fresh, tmp_path / "a")
    assert lowrank.adapter_names(fresh) == []


class Named(nn.Module):
    """Linear layers under ModuleDict keys that are no regular expressions of themselves."""

    def __init__(self, keys):
        super().__init__()
        self.d = nn.ModuleDict({k: nn.Linear(8, 8) for k in keys})

    def forward(self, x):
        for m in self.d.values():
            x = m(x)
        return x


@pytest.mark.parametrize("key", ["a+b", "q(1)", "x$", "w[0]", "w(", "v)"])
def test_pattern_keys_of_names_with_regex_characters_load_in_peft_and_lowrank(key, tmp_path):
    torch.manual_seed(0)
    base = Named([key, "c", "e"]).eval()
    ours = copy.deepcopy(base)
    lowrank.inject(ours, lowrank.LoraConfig(r=4, targets=nn.Linear, rank_pattern={lambda n, m: n == f"d.{key}": 2}))
    nudge(ours)
    lowrank.save_adapter(ours, tmp_path / "a")
    x = torch.randn(2, 8)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
        assert theirs.base_model.model.d[key].lora_A["default"].weight.shape[0] == 2
        assert torch.equal(theirs(x), ours(x))
        back = copy.deepcopy(base)
        lowrank.load_adapter(back, tmp_path / "a")
        assert back.d[key].r["default"] == 2 and torch.equal(back(x), ours(x))


def roberta_classifier() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=40, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def test_all_linear_leaves_a_classifiers_head_whole_and_the_file_goes_both_ways(tmp_path):
    """RoBERTa's head is a module of two linear layers: PEFT's all-linear leaves it to modules_to_save, and so
    does lowrank's (it saved no head once LoRA touched one of its layers, silently)."""
    base = roberta_classifier()
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"all-linear leaves RobertaForSequenceClassification's task head "
                                         r"\['classifier'\] out, as PEFT does, and inject freezes it"):
        assert not [n for n in lowrank.inject(ours, lowrank.LoraConfig(r=2)) if "classifier" in n]
    assert not any(p.requires_grad for p in ours.classifier.parameters())
    nudge(ours, lambda n, p: "lora_B" in n or n.startswith("classifier."))
    lowrank.save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert torch.equal(theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    nudge(pm, lambda n, p: "lora_B" in n or "modules_to_save" in n)
    pm.save_pretrained(tmp_path / "theirs")
    back = copy.deepcopy(base)
    lowrank.load_adapter(back, tmp_path / "theirs")  # strict: no LoRA looked for inside the saved head
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, pm(input_ids=IDS).logits)


def test_lora_on_the_head_itself_warns_that_the_head_is_not_saved(tmp_path):
    model = roberta_classifier()
    lowrank.inject(model, lowrank.LoraConfig(r=2, targets=["dense"]))  # classifier.dense among them
    with pytest.warns(UserWarning, match=r"LoRA adapts \['classifier.dense'\] of RobertaForSequenceClassification's "
                                         r"task head, so the head's own weights are not saved"):
        lowrank.save_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_modules_to_save_on_tied_weights_are_refused(saved, tmp_path):
    """PEFT trains an untied copy; loaded into the shared weight it changed the other end too."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved))
    pm.save_pretrained(tmp_path / "a")
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"modules_to_save=\[.*\] names weights tied to \["):
        lowrank.load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("config", [lowrank.LoraConfig(r=2, targets=["all-linear", "classifier.dense"]),
                                    lowrank.LoraConfig(r=2, exclude=["classifier"]),
                                    lowrank.AdapterConfig(targets="all-linear")], ids=["adapted", "excluded", "bottleneck"])
def test_no_frozen_head_warning_where_the_head_is_adapted_excluded_or_not_lora(config):
    import warnings

    model = roberta_classifier()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        wrapped = lowrank.inject(model, config)
    assert wrapped and not [str(w.message) for w in seen if "task head" in str(w.message)]
    adapted = any("classifier" in n for n in wrapped)  # LoRA on the head where asked, none where excluded
    assert adapted == (isinstance(config, lowrank.LoraConfig) and not config.exclude)


def test_the_head_rule_sees_through_torch_compiles_wrapper():
    """The class name that says "a classifier" is the model's inside the wrapper."""
    model = roberta_classifier()
    with pytest.warns(UserWarning, match=r"task head \['classifier'\] out"):
        wrapped = lowrank.inject(torch.compile(model), lowrank.LoraConfig(r=2))
    assert wrapped and not [n for n in wrapped if "classifier" in n]
