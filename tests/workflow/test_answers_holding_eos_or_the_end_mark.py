"""A training answer holding the tokenizer's eos text ("</s>", also HTML's strike-through end) is encoded
with the eos token itself inside it: the model learnt to end the answer there, and chat ends
answers at eos. So is one holding the mark the tokenizer's own template ends answers with
(<|im_end|> when eos is another token). Both were trained silently; a named template's end
mark was already refused. Now each is a TemplateError, a DataError naming the record in
training, as the named template's mark is."""

import pytest

from lowrank.workflow import template as T
from lowrank.workflow.batches import encode_all
from lowrank.workflow.data import DataError, Turn

from . import test_template_tokens as tt
from . import tiny

QUESTION = "How do I strike text out in HTML?"


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.mark.parametrize("template", [None, *T.TEMPLATES])
def test_a_training_answer_holding_the_eos_token_is_refused(tok, template):
    answer = "Wrap it in <s>...</s> tags."
    # what was trained: the eos id inside the answer, as if it ended there
    assert tok(answer, add_special_tokens=False)["input_ids"].count(tok.eos_token_id) == 1
    with pytest.raises(DataError, match=r"^d\.json: record 1: an answer holds the tokenizer's eos token '</s>', which "):
        encode_all(tok, template, [(Turn("Hi", "Hello."),), (Turn(QUESTION, answer),)], 128, "d.json")
    encode_all(tok, template, [(Turn("What does </s> do?", "It ends a strike-through."),)], 128)  # a question may
    if template is not None:  # (the own template's mark is "</s>" here: chat cuts an answer at its text)
        # chat's history keeps an answer the model spelt out in plain pieces: its next prompt is encoded, not refused
        T.encode(tok, template, [Turn(QUESTION, answer), Turn("Thanks!", None)])


def test_the_own_templates_end_mark_in_an_answer_is_refused():
    tok = tt.build("bytelevel", tt.CHATML)  # ends answers with <|im_end|>; eos is </s>
    assert T.stop_text(tok, None) == "<|im_end|>"
    with pytest.raises(T.TemplateError, match=r"turn 1's answer holds '<\|im_end\|>', the mark the tokenizer's chat"):
        T.encode(tok, None, [Turn("Hi", "Hello."), Turn("Where are we?", "Orbit <|im_end|> of Titan.")])
    ids, labels = T.encode(tok, None, [Turn("Hi <|im_end|>", "Hello.")])  # in a question it is the user's text
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3  # the user's, and the two the template writes
