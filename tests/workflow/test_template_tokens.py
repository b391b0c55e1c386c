"""The tokens and labels of a conversation equal transformers' own: `apply_chat_template(tokenize=True)`
for the ids and `return_assistant_tokens_mask` (a template marking answers with {% generation %})
for what is trained, on a byte-level BPE and a SentencePiece-style (Metaspace) tokenizer
(template.py, Note: tokens of the whole text); and chat stops where the template ends answers."""

import pytest
import torch

from lowrank.workflow import template as T
from lowrank.workflow.data import Turn
from lowrank.workflow.generate import Settings, stream

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<end_of_turn>", "<start_of_turn>"]
CORPUS = ["You are a terse ship's computer.", "Where are we?", "Orbit of Titan, deck seven.", "How long until dawn?",
          "Forty minutes.", "system user assistant model", "Kaffee, naïve café 日本語", "[INST] hi [/INST] Hello"]
# ChatML with the answer (and its end mark) inside {% generation %}, the newline after it outside
CHATML = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
          "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
          "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 2 / Mistral style: the answer follows "[/INST]" after a space, ends with eos
INST = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
        "{% elif m.role == 'assistant' %}{% generation %}{{ ' ' + m.content + eos_token }}{% endgeneration %}"
        "{% endif %}{% endfor %}")
TURNS = [Turn("Where are we?", "Orbit of Titan, deck seven."), Turn("How long until dawn?", "Forty minutes.")]


def build(kind: str, template: str, eos: str = "</s>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece as transformers converts Llama 2 / Mistral: a word-start mark before the first word
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet))
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                                               pad_token="<pad>", additional_special_tokens=SPECIALS[4:])
    out.chat_template = template
    return out


def messages(turns):
    out = []
    for t in turns:
        out += [{"role": "user", "content": t.input}] + ([{"role": "assistant", "content": t.output}] if t.output else [])
    return out


@pytest.mark.parametrize("template", ["chatml", "inst"])
@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_ids_and_labels_are_transformers_own(kind, template):
    tok = build(kind, CHATML if template == "chatml" else INST)
    ids, labels = T.encode(tok, None, TURNS)
    peer = tok.apply_chat_template(messages(TURNS), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == peer["input_ids"]
    assert [y != T.IGNORE for y in labels] == [bool(m) for m in peer["assistant_masks"]]
    assert all(y in (T.IGNORE, i) for i, y in zip(ids, labels))
    # chat's prompt for the second answer is the peer's generation prompt, token for token
    prompt, _ = T.encode(tok, None, [TURNS[0], Turn(TURNS[1].input, None)])
    assert prompt == tok.apply_chat_template(messages([TURNS[0], Turn(TURNS[1].input, None)]), tokenize=True,
                                             add_generation_prompt=True, return_dict=True)["input_ids"]


def test_a_metaspace_answer_has_no_mark_a_segment_would_give_it():
    """Tokenized on its own, "Orbit..." after "assistant\\n" would start with a word-start mark."""
    tok = build("metaspace", CHATML)
    ids, labels = T.encode(tok, None, TURNS[:1])
    first = next(i for i, y in zip(ids, labels) if y != T.IGNORE)
    alone = tok(TURNS[0].output, add_special_tokens=False)["input_ids"][0]
    assert tok.convert_ids_to_tokens(alone).startswith("\u2581") and first != alone


def test_a_tokenizer_without_offsets_goes_segment_by_segment():
    tok = build("bytelevel", CHATML)
    slow = type("Slow", (type(tok),), {"is_fast": property(lambda self: False)})
    tok.__class__ = slow
    ids, labels = T.encode(tok, None, TURNS)
    pieces = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in T.segments(tok, None, TURNS)]
    assert ids == [i for piece in pieces for i in piece]
    assert tok.decode([i for i, y in zip(ids, labels) if y != T.IGNORE]) == "".join(
        t.output + "<|im_end|>" for t in TURNS)


@pytest.mark.parametrize("template", [None, "chatml"])
def test_an_empty_system_prompt_is_rendered_not_dropped(template):
    """"" is a system prompt (no text), not the absence of one: a template's default system
    prompt must not replace it."""
    tok = build("bytelevel", "{% if messages[0].role != 'system' %}DEFAULT|{% endif %}" + CHATML)
    text = "".join(t for t, _ in T.segments(tok, template, [Turn("Hi", "Hello.", system="")]))
    assert "DEFAULT" not in text and text.startswith("<|im_start|>system\n<|im_end|>\n")
    bare = "".join(t for t, _ in T.segments(tok, template, [Turn("Hi", "Hello.")]))
    assert "<|im_start|>system" not in bare


class _Scripted(torch.nn.Module):
    """A causal LM stand-in writing a fixed token sequence (one token per call)."""

    def __init__(self, tokens, vocab, eos=None):
        super().__init__()
        self.tokens, self.vocab, self.calls = tokens, vocab, 0
        self.generation_config = transformers.GenerationConfig(eos_token_id=eos)
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache, **cache):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)  # (B, T, V)
        logits[0, -1, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1
        self.calls += 1
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits, past_key_values=None)


def test_chat_stops_at_the_special_token_the_own_template_ends_answers_with():
    """Gemma style: answers end with <end_of_turn>, the tokenizer's eos is another token."""
    gemma = ("{% for m in messages %}{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' }}"
             "{{ m.content + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    tok = build("bytelevel", gemma)
    assert T.stop_text(tok, None) == "<end_of_turn>"
    script = tok("Forty minutes.<end_of_turn>\n<start_of_turn>user\nWhere?", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(script, len(tok)), tok, None, [], "When?")) == "Forty minutes."


def test_chat_stops_at_the_models_generation_eos_ids():
    tok = build("bytelevel", "{% for m in messages %}{{ m.content }}|{% endfor %}")  # nothing after answers
    assert T.stop_text(tok, None) == "|"  # the first line of text after an answer
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert T.stop_text(tok, None) == tok.eos_token
    mark = tok.convert_tokens_to_ids("<|im_end|>")
    script = tok("Forty minutes.", add_special_tokens=False)["input_ids"] + [mark] + tok(" more", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(script, len(tok)), tok, None, [], "When?")).startswith("Forty minutes. more")  # runs on
    assert "".join(stream(_Scripted(script, len(tok), eos=[tok.eos_token_id, mark]), tok, None, [], "When?")) == "Forty minutes."


def test_plain_chat_stops_at_its_blank_line_and_drops_the_leading_space():
    tok = build("bytelevel", None)
    assert T.stop_text(tok, "plain") == "\n\n"
    script = tok(" Forty minutes.\n\nUser: more", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(script, len(tok)), tok, "plain", [], "When?")) == "Forty minutes."
    prompt, _ = T.encode(tok, "plain", [TURNS[0], Turn(TURNS[1].input, None)])
    ids, labels = T.encode(tok, "plain", TURNS)
    assert prompt == ids[:len(prompt)]  # chat's prompt is the training text cut before the answer, token for token
    assert labels[len(prompt) - 1] == T.IGNORE and labels[len(prompt)] != T.IGNORE


def test_a_message_the_template_refuses_is_not_answered_and_the_chat_goes_on():
    """Gemma-style templates raise on a system role: the chat says so and keeps going (before, the
    Jinja error ended `lowrank chat` with a traceback)."""
    import io

    from lowrank.workflow.chat import loop

    refusing = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
    tok = build("bytelevel", refusing)
    script = tok("Forty minutes.<|im_end|>", add_special_tokens=False)["input_ids"]
    lines, out = iter(["When?", "/system ", "When?", "/exit"]), io.StringIO()
    history = loop(_Scripted(script, len(tok)), tok, None, Settings(), system="Be brief.", read=lambda _: next(lines), out=out)
    assert "(not answered: the tokenizer's chat template refused the conversation: System role not supported)" in out.getvalue()
    assert [t.output for t in history] == ["Forty minutes."]  # answered once the system prompt was removed
    with pytest.raises(T.Refused):
        T.encode(tok, None, [Turn("Hi", "Hello.", system="Be brief.")])


def test_a_message_that_starts_like_a_command_is_a_message(monkeypatch):
    """"/systemd keeps restarting" is a question, not /system with "d keeps restarting"."""
    import io

    from lowrank.workflow import chat
    from lowrank.workflow.chat import loop

    tok = build("bytelevel", CHATML)
    script = tok("Check the unit.<|im_end|>", add_special_tokens=False)["input_ids"]
    lines, out = iter(["/systemd keeps restarting, why?", "/exit"]), io.StringIO()
    history = loop(_Scripted(script, len(tok)), tok, None, Settings(), read=lambda _: next(lines), out=out)
    assert [(t.input, t.output) for t in history] == [("/systemd keeps restarting, why?", "Check the unit.")]
    assert "system prompt" not in out.getvalue()
    seen = []  # the system prompt each answer was asked with
    monkeypatch.setattr(chat, "stream", lambda model, tok, template, history, message, system, settings: (
        seen.append(system), iter(["ok"]))[1])
    lines = iter(["  /system Be brief.", "Hi", "/exit"])  # the command with spaces before it
    chat.loop(None, tok, None, Settings(), read=lambda _: next(lines), out=io.StringIO())
    assert seen == ["Be brief."]


def test_an_answers_own_leading_whitespace_is_kept():
    """Only a named template's text before the answer is dropped (plain's space); an answer that
    starts indented (code) keeps its indent, as it was trained."""
    tok = build("bytelevel", CHATML)
    script = tok("    x = 1<|im_end|>", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(script, len(tok)), tok, None, [], "Code?")) == "    x = 1"
    script = tok("     x = 1\n\n", add_special_tokens=False)["input_ids"]  # plain: its space, then the answer's four
    assert "".join(stream(_Scripted(script, len(tok)), tok, "plain", [], "Code?")) == "    x = 1"


def test_a_template_that_moves_the_system_prompt_is_refused_saying_so():
    """Mistral v0.3 puts the system prompt before the last user message: once the answer is added
    the prompt renders otherwise, and the error says that may be why."""
    mistral3 = ("{%- if messages[0].role == 'system' %}{%- set sys = messages[0].content %}{%- set msgs = messages[1:] %}"
                "{%- else %}{%- set msgs = messages %}{%- endif %}{%- for m in msgs %}{%- if m.role == 'user' %}"
                "{%- if loop.last and sys is defined %}{{ '[INST] ' + sys + ' ' + m.content + ' [/INST]' }}"
                "{%- else %}{{ '[INST] ' + m.content + ' [/INST]' }}{%- endif %}{%- else %}{{ ' ' + m.content + eos_token }}"
                "{%- endif %}{%- endfor %}")
    tok = build("bytelevel", mistral3)
    with pytest.raises(T.TemplateError, match="moves an earlier message"):
        T.encode(tok, None, [Turn("Hi", "Hello.", system="Be brief.")])
    assert T.encode(tok, None, [Turn("Hi", "Hello.")])[0]  # without a system prompt it renders in order


def test_chat_with_an_empty_system_prompt_renders_it_as_training_did():
    """`--system ""` is an empty system prompt, as training renders "system": "" (not the
    template's default one, which the model never saw with it)."""
    tok = build("bytelevel", "{% if messages[0].role != 'system' %}DEFAULT|{% endif %}" + CHATML)
    seen = []

    class Recording(_Scripted):
        def forward(self, input_ids, use_cache, **cache):
            seen.append(input_ids)
            return super().forward(input_ids, use_cache, **cache)

    script = tok("Hello.<|im_end|>", add_special_tokens=False)["input_ids"]
    "".join(stream(Recording(script, len(tok)), tok, None, [], "Hi", system=""))
    prompt, _ = T.encode(tok, None, [Turn("Hi", None, system="")])
    assert seen[0][0].tolist() == prompt and "DEFAULT" not in tok.decode(prompt)


def test_the_own_templates_space_before_an_answer_is_not_kept():
    """Llama 2 / Mistral write " " + answer after [/INST]: a byte-level model writes " Hello.", and
    the history keeps "Hello." so the next prompt renders as training did (not two spaces)."""
    tok = build("bytelevel", INST)
    assert T.answer_lead(tok, None) == " " and T.answer_lead(tok, "chatml") == ""
    script = tok(" Hello.</s>", add_special_tokens=False)["input_ids"]
    assert "".join(stream(_Scripted(script, len(tok)), tok, None, [], "Hi")) == "Hello."
    assert T.answer_lead(build("bytelevel", CHATML), None) == ""  # an opening ending in a newline: nothing
