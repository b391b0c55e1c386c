"""PromptConfig(init="text"): the tokenizer's input_ids as a tensor (a tokenizer called with
return_tensors="pt", shape (1, k) or (k,)) give the same prompt as the plain list; anything but
integers is named in the error. Before, a tensor raised "Boolean value of Tensor with more than one
value is ambiguous" from inside the range check."""

from __future__ import annotations

import pytest
import torch

import lowrank

from . import models

IDS = [5, 9, 2]


class Tokenizer:
    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text):
        return {"input_ids": self.ids}


def prompt_for(ids):
    model = models.llama()
    lowrank.inject(model, lowrank.PromptConfig(num_virtual_tokens=5, init="text", init_text="hi",
                                               tokenizer=Tokenizer(ids)))
    return model.get_input_embeddings().prompts["default"]


def test_token_ids_as_a_tensor_give_the_prompt_of_the_list():
    want = prompt_for(IDS)
    assert torch.equal(want, models.llama().get_input_embeddings().weight[[5, 9, 2, 5, 9]])  # cut or repeated to n
    assert torch.equal(prompt_for(torch.tensor([IDS])), want)
    assert torch.equal(prompt_for(torch.tensor(IDS)), want)


def test_ids_that_are_not_integers_are_named():
    with pytest.raises(ValueError, match=r"should be the token ids of the text, integers; got \['a', 'b'\]"):
        prompt_for(["a", "b"])
