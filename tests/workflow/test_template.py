"""Chat templates: the segments render exactly the text the tokenizer's template renders,
only answer tokens are trained, and the chat prompt is the training text cut at the answer."""

import copy

import pytest
import torch

from lowrank.workflow import template as T
from lowrank.workflow.data import Turn
from lowrank.workflow.generate import Settings, stream

from . import tiny

TURNS = (Turn("Where are we?", "Orbit of Titan, deck seven.", tiny.SYSTEM), Turn("How long until dawn?", "Forty minutes."))
MESSAGES = [{"role": "system", "content": tiny.SYSTEM}, {"role": "user", "content": TURNS[0].input},
            {"role": "assistant", "content": TURNS[0].output}, {"role": "user", "content": TURNS[1].input},
            {"role": "assistant", "content": TURNS[1].output}]
# ChatML as Qwen2's tokenizer_config.json writes it (without its default system prompt): the peer
# rendering our named "chatml" template must equal.
CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def test_own_template_segments_are_the_tokenizers_rendering(tok):
    segs = T.segments(tok, None, TURNS)
    assert "".join(text for text, _ in segs) == tok.apply_chat_template(MESSAGES, tokenize=False)
    trained = [text for text, t in segs if t]
    assert trained == [TURNS[0].output + tok.eos_token, TURNS[1].output + tok.eos_token]  # not the newline after it


def test_named_chatml_equals_the_jinja_chatml(tok):
    segs = T.segments(tok, "chatml", TURNS)
    peer = copy.copy(tok)
    peer.chat_template = CHATML_JINJA
    assert "".join(text for text, _ in segs) == peer.apply_chat_template(MESSAGES, tokenize=False)
    for turn in range(2):  # the prompt for turn i equals the peer's generation prompt
        prompt = "".join(t for t, _ in T.segments(tok, "chatml", [*TURNS[:turn], Turn(TURNS[turn].input, None, TURNS[turn].system)]))
        assert prompt == peer.apply_chat_template(MESSAGES[:2 + 2 * turn], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [None, *T.TEMPLATES])
def test_only_answer_tokens_are_trained(tok, template):
    ids, labels = T.encode(tok, template, TURNS)
    assert len(ids) == len(labels)
    trained = [i for i, y in zip(ids, labels) if y != T.IGNORE]
    assert all(y in (T.IGNORE, i) for i, y in zip(ids, labels))
    answer = "{output}" if template is None else T.TEMPLATES[template].answer
    end = tok.eos_token + "\n" if template is None else T.TEMPLATES[template].end
    mark = end.strip() or end  # what follows the end mark (a newline) is not trained
    assert tok.decode(trained) == "".join(answer.format(output=t.output) + mark for t in TURNS)
    assert tok.decode(ids, skip_special_tokens=False).endswith(TURNS[1].output + end)


@pytest.mark.parametrize("template", [None, *T.TEMPLATES])
def test_chat_prompt_is_the_training_text_cut_before_the_answer(tok, template):
    """What chat feeds the model for turn 2 equals the training tokens up to that answer."""
    ids, labels = T.encode(tok, template, TURNS)
    prompt, _ = T.encode(tok, template, [TURNS[0], Turn(TURNS[1].input, None)])
    assert prompt == ids[:len(prompt)]
    assert labels[len(prompt) - 1] == T.IGNORE and labels[len(prompt)] != T.IGNORE  # the second answer starts there


def test_a_template_that_rewrites_history_is_refused(tok):
    t = copy.copy(tok)  # renders earlier answers only when no generation prompt follows
    t.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or not add_generation_prompt %}"
                       "{{ m['content'] }}|{% endif %}{% endfor %}")
    with pytest.raises(T.TemplateError, match="renders turns before turn 1 differently"):
        T.segments(t, None, TURNS)


def test_a_template_that_ignores_add_generation_prompt_is_refused(tok):
    """Its assistant opening comes only with the answer: it was trained as if it were the answer,
    and chat's prompt lacks it. A template with no opening at all is fine."""
    t = copy.copy(tok)
    t.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    with pytest.raises(T.TemplateError, match="ignores add_generation_prompt: turn 0's assistant opening '<assistant>'"):
        T.segments(t, None, TURNS)
    t.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert [trained for _, trained in T.segments(t, None, TURNS)] == [False, True] * len(TURNS)


def test_missing_or_unknown_template_is_an_error(tok):
    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(T.TemplateError, match="no chat template; set template to one of"):
        T.encode(bare, None, TURNS)
    with pytest.raises(T.TemplateError, match="got 'vicuna'"):
        T.encode(tok, "vicuna", TURNS)


@pytest.mark.parametrize("template, answer", [("plain", "Orbit of Titan.\n\nForty minutes."),
                                              ("chatml", "Orbit <|im_end|> of Titan."), ("internlm", "a <eoa> b")])
def test_an_answer_holding_the_end_mark_is_refused(tok, template, answer):
    """Chat stops an answer at the template's end mark: such an answer would be trained whole and
    answered cut (plain's mark is a blank line)."""
    with pytest.raises(T.TemplateError, match=r"an answer holds the template's end mark"):
        T.encode(tok, template, (Turn("Where are we?", answer),))
    T.encode(tok, template, (Turn("Where\n\nare we?", "Orbit of Titan."),))  # a question may hold it


class _Output(dict):
    __getattr__ = dict.__getitem__  # attribute access, as transformers' ModelOutput has


class _Scripted(torch.nn.Module):
    """A stand-in causal LM that writes a fixed token sequence, one token per call."""

    def __init__(self, tokens, vocab):
        super().__init__()
        self.tokens, self.vocab, self.calls = tokens, vocab, 0
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache, **cache):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)  # (B, T, V)
        logits[0, -1, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1
        self.calls += 1
        return _Output(logits=logits, cache=None)


def test_stream_yields_pieces_and_stops_at_the_end_mark(tok):
    answer = "Orbit of Titan."
    model = _Scripted(tok(answer + "<|im_end|>\nnever", add_special_tokens=False)["input_ids"], len(tok))
    pieces = list(stream(model, tok, "chatml", [], "Where?", settings=Settings(max_new_tokens=50)))
    assert "".join(pieces) == answer  # the stop mark and what follows are not shown
    assert len(pieces) > 1  # streamed: more than one piece


def test_stream_stops_at_eos_and_at_max_new_tokens(tok):
    ids = tok("Forty minutes.", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(ids + [tok.eos_token_id], len(tok)), tok, None, [], "When?")) == "Forty minutes."
    two = "".join(stream(_Scripted(ids, len(tok)), tok, None, [], "When?", settings=Settings(max_new_tokens=2)))
    assert two == tok.decode(ids[:2])


def test_stream_stops_at_an_end_mark_that_is_a_special_token():
    tok = tiny.build_tokenizer()  # a fresh one: adding a token changes it
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    ids = tok("Forty minutes.", add_special_tokens=False)["input_ids"]
    mark = tok.convert_tokens_to_ids("<|im_end|>")
    tail = tok(" and more", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(ids + [mark] + tail, len(tok)), tok, "chatml", [], "When?")) == "Forty minutes."
