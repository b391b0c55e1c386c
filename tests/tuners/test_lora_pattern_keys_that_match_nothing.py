"""rank_pattern / alpha_pattern keys take targets' syntax; PEFT reads them as regular expressions
matched as re.match(rf"(.*\\.)?({key})$", name). A PEFT-style key ("mlp.*", "[qv]_proj",
"q_proj|v_proj") matched nothing here, and the adapter silently took the default rank and alpha
where PEFT gives the pattern's (lowrank/inject_warnings.py, Note: pattern keys that match
nothing): inject now warns, naming the key and PEFT's form of it, and that form picks PEFT's
ranks. PEFT 0.21 is the oracle."""

from __future__ import annotations

import copy
import warnings

import pytest

import lowrank
from lowrank.config import LoraConfig
from lowrank.inject import inject
from lowrank.inject_warnings import UnmatchedPatternWarning

from . import models

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def ranks(model) -> dict[str, int]:
    return {n: m.r["default"] for n, m in model.named_modules() if type(m).__name__.startswith("Lora")
            and isinstance(getattr(m, "r", None), dict)}


def peft_ranks(model, pattern: dict, field: str) -> dict[str, float]:
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(model)
    key = {"rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}[field]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, **{key: pattern}), model)
    attr = "r" if field == "rank_pattern" else "lora_alpha"
    return {n: getattr(m, attr)["default"] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def ours(model, pattern: dict, field: str) -> dict[str, float]:
    model = copy.deepcopy(model)
    inject(model, LoraConfig(r=4, alpha=4, targets=TARGETS, **{field: pattern}))
    layers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "r", None), dict) and hasattr(m, "scaling")}
    if field == "rank_pattern":
        return {n: m.r["default"] for n, m in layers.items()}
    return {n: m.scaling["default"] * m.r["default"] for n, m in layers.items()}  # alpha = s r


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["mlp.*", "[qv]_proj", "q_proj|v_proj", r"layers\.1\..*"])
def test_a_peft_style_key_that_matches_nothing_warns_and_its_peft_form_is_peft(key, field):
    model = models.llama()
    theirs = peft_ranks(model, {key: 2}, field)
    assert any(v == 2 for v in theirs.values())  # PEFT applies the key
    with pytest.warns(UnmatchedPatternWarning) as record:
        got = ours(model, {key: 2}, field)
    message = str(record[0].message)
    assert field in message and repr(key) in message and repr(rf"re:(.*\.)?({key})") in message
    assert all(v == 4 for v in got.values())  # the key set nothing (it did so silently before)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedPatternWarning)
        assert ours(model, {rf"re:(.*\.)?({key})": 2}, field) == theirs  # the form the warning names: PEFT's choice


@pytest.mark.parametrize("pattern", [{"q_proj": 2}, {"layers.0.self_attn.q_proj": 3, "q_proj": 2},
                                     {"model.layers.1.mlp.gate_proj": 5}, {"*.1.self_attn.[qv]_proj": 6}])
def test_keys_that_match_say_nothing(pattern):
    model = models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedPatternWarning)
        got = ours(model, pattern, "rank_pattern")
    assert any(v != 4 for v in got.values())
    if not any("*" in k for k in pattern):  # a glob is no regular expression for PEFT
        assert got == peft_ranks(model, pattern, "rank_pattern")


def test_only_the_unmatched_keys_are_named_and_parameter_keys_match_parameters():
    model = models.mixtral()
    with pytest.warns(UnmatchedPatternWarning) as record:
        inject(model, LoraConfig(r=4, targets=["q_proj"], parameters=["experts.gate_up_proj"],
                                 rank_pattern={"experts.gate_up_proj": 2, "q_proj": 3, "k_proj": 5}))
    assert len(record) == 1 and "['k_proj']" in str(record[0].message)
    layer = model.model.layers[0].mlp.experts
    assert layer.r["default"] == 2 and model.model.layers[0].self_attn.q_proj.r["default"] == 3


def test_load_adapter_does_not_warn_of_the_keys_it_makes(tmp_path):
    """load_adapter turns each PEFT key into ours, some only for PEFT's fallback (a key read as the
    module's exact name), which match nothing: not the user's keys, so no warning."""
    model = models.llama()
    inject(model, LoraConfig(r=4, targets=TARGETS, rank_pattern={"model.layers.0.self_attn.q_proj": 2}))
    lowrank.save_adapter(model, tmp_path)
    fresh = models.llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedPatternWarning)
        lowrank.load_adapter(fresh, tmp_path)
    assert ranks(fresh) == ranks(model)
