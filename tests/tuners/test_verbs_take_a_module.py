"""Every verb on an injected model says what it takes when given something else (a state dict,
a path, a pipeline): eject, set_active, mark_trainable, per_sample, adapter_names,
active_adapters and save_adapter raised AttributeError ("'dict' object has no attribute
'modules'"), where inject, summary, merge and disabled named the verb and what they got."""

import pytest
from torch import nn

import lowrank
from lowrank.inject import active_adapters, adapter_names, eject, mark_trainable, per_sample, set_active

VERBS = {
    "eject": lambda m: eject(m),
    "set_active": lambda m: set_active(m, "default"),
    "mark_trainable": lambda m: mark_trainable(m),
    "adapter_names": lambda m: adapter_names(m),
    "active_adapters": lambda m: active_adapters(m),
    r"per_sample\(model, names\)": lambda m: per_sample(m, ["default"]).__enter__(),
    "save_adapter": lambda m: lowrank.save_adapter(m, "/nonexistent/never-written"),
}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("given, seen", [(nn.Linear(2, 2).state_dict(), "OrderedDict"), ("model", "str")])
def test_a_verb_given_no_module_says_so(verb, given, seen):
    with pytest.raises(TypeError, match=f"^{verb} takes an nn.Module \\(the model\\); got {seen}$"):
        VERBS[verb](given)
