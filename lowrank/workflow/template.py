"""Turning conversations into text and tokens, the same way for training and for chat.

A conversation becomes a list of segments `(text, trained)`: the prompt part of each turn
(system, user message, the assistant's opening) is not trained; the answer and the mark that
ends it (so the model learns to stop: stop_text) are; what the template writes after the mark
(the newline after ChatML's <|im_end|>, say) is not, as chat stops at the mark. The text comes
from the tokenizer's own chat template when it has one (`template=None`), or from a named
template in TEMPLATES.

Note: tokens of the whole text. The text is tokenized at once, as transformers'
`apply_chat_template(tokenize=True)` does, so the tokens are the ones the model meets at
inference anywhere else; a token is trained when its characters overlap a trained segment, as
`return_assistant_tokens_mask` counts them. (Tokenizing each segment on its own, as an earlier
version did, gave SentencePiece-style tokenizers a word-start mark at every segment and
byte-level ones other merges at the cuts.) Chat encodes its prompt the same way. A tokenizer
without character offsets (a slow one) still tokenizes segment by segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .data import Turn

IGNORE = -100  # label of an untrained token: torch.nn.functional.cross_entropy's ignore_index


class TemplateError(ValueError):
    """A template that cannot render a conversation the way training needs."""


class Refused(TemplateError):
    """The tokenizer's chat template raised on this conversation (Jinja's raise_exception: roles
    that do not alternate, a system role it does not support...)."""


@dataclasses.dataclass(frozen=True)
class NamedTemplate:
    """A chat format as four pieces of text around the turns."""

    system: str  # "{system}" is replaced by the system prompt
    user: str  # "{input}" is replaced by the user's message; ends with the assistant's opening
    end: str  # after each answer; generation stops when the model writes it
    bos: bool = True  # start the text with the tokenizer's bos token, when it has one
    answer: str = "{output}"  # the answer as trained ("{output}" is replaced by the turn's output)


TEMPLATES = {
    # ChatML (Qwen, many others)
    "chatml": NamedTemplate("<|im_start|>system\n{system}<|im_end|>\n",
                            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"),
    # InternLM-Chat, the model of the seed notes (XTuner's `internlm_chat` template)
    "internlm": NamedTemplate("<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>\n"),
    # no markup beyond two labels: for tokenizers without special tokens. The space after
    # "Assistant:" belongs to the answer, so no token spans the prompt's end (byte-level BPE
    # writes " Hello" as one token) and chat's prompt ends where training's does.
    "plain": NamedTemplate("{system}\n\n", "User: {input}\nAssistant:", "\n\n", bos=False, answer=" {output}"),
}


def check_template(template: str | None, tokenizer=None) -> None:
    """Raise TemplateError unless `template` names a template that exists for `tokenizer`."""
    if template is None:
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"the tokenizer has no chat template; set template to one of {sorted(TEMPLATES)}")
    elif template not in TEMPLATES:
        raise TemplateError(f"template must be null (the tokenizer's own) or one of {sorted(TEMPLATES)}; got {template!r}")


def _answer(answer: str, output: str, mark: str | None) -> list[tuple[str, bool]]:
    """An answer's text as (trained up to the end of `mark`, untrained rest) segments."""
    after = answer.find(output)
    at = answer.find(mark, after + len(output) if after >= 0 else 0) if mark else -1
    cut = len(answer) if at < 0 else at + len(mark)
    return [(answer[:cut], True)] + ([(answer[cut:], False)] if cut < len(answer) else [])


def _named(t: NamedTemplate, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    out = []
    for turn in turns:
        # a system of "" is a system prompt too (rendered empty), as in the tokenizer's own templates
        prompt = (t.system.format(system=turn.system) if turn.system is not None else "") + t.user.format(input=turn.input)
        out.append((prompt, False))
        if turn.output is not None:
            mark = t.end.strip() or t.end  # stop_text's: chat stops an answer where the model writes it
            if mark in turn.output:
                raise TemplateError(f"an answer holds the template's end mark {mark!r}, where chat would cut it short "
                                    f"(plain's is a blank line); use another template ({sorted(TEMPLATES)}, or the "
                                    "tokenizer's own), or take the mark out of the answers")
            out += _answer(t.answer.format(output=turn.output) + t.end, turn.output, mark)
    return out


def _own(tokenizer, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """Segments from the tokenizer's chat template, rendering one message more each time:
    what a message adds to the text is its segment."""
    from jinja2 import TemplateError as JinjaError  # comes with transformers

    def render(messages, generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except JinjaError as e:
            raise Refused(f"the tokenizer's chat template refused the conversation: {e}") from e

    out, messages, done, mark = [], [], "", stop_text(tokenizer, None)
    for i, turn in enumerate(turns):
        if mark and turn.output is not None and mark in turn.output:  # as _named refuses its template's mark
            raise TemplateError(f"turn {i}'s answer holds {mark!r}, the mark the tokenizer's chat template ends "
                                "answers with, where chat would cut it short; take the mark out of the answers")
        if turn.system is not None:  # "" too: an empty system prompt, not the template's default one
            messages.append({"role": "system", "content": turn.system})
        messages.append({"role": "user", "content": turn.input})
        prompt = render(messages, True)
        if not prompt.startswith(done):
            raise TemplateError(f"the tokenizer's chat template renders turns before turn {i} differently once turn {i} "
                                "is added, so the prompt seen in training would not be the one seen in chat; "
                                f"use a named template ({sorted(TEMPLATES)})")
        out.append((prompt[len(done):], False))
        done = prompt
        if turn.output is None:
            break
        messages.append({"role": "assistant", "content": turn.output})
        full = render(messages, False)
        if not full.startswith(prompt):
            raise TemplateError(f"the tokenizer's chat template renders turn {i}'s prompt otherwise once its answer "
                                "is added: it ends the prompt otherwise than add_generation_prompt does, or moves an "
                                "earlier message (Mistral v0.3's system prompt goes before the last user message); "
                                f"use a named template ({sorted(TEMPLATES)})")
        answer = full[len(prompt):]
        opening = answer[:max(answer.find(turn.output), 0)]
        if opening.strip():  # the template ignores add_generation_prompt: its opening would be trained, and absent in chat
            raise TemplateError(f"the tokenizer's chat template ignores add_generation_prompt: turn {i}'s assistant "
                                f"opening {opening!r} is not in the prompt, so training would learn it and chat would "
                                f"not give it; use a named template ({sorted(TEMPLATES)})")
        out += _answer(answer, turn.output, mark)
        done = full
    return out


def segments(tokenizer, template: str | None, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of `turns`. A last turn whose output is None ends with the
    assistant's opening: the prompt to generate from."""
    check_template(template, tokenizer)
    if template is None:
        return _own(tokenizer, turns)
    return _named(TEMPLATES[template], turns)


def check_answers(tokenizer, turns: Sequence[Turn]) -> None:
    """TemplateError for a training answer holding the tokenizer's eos text (Llama's "</s>", which
    HTML's strike-through ends with too): the tokenizer reads it as the eos token itself, so the
    model would learn to end the answer there, and chat ends answers at eos. (Not for chat's
    history: an answer the model spelt out in plain pieces is kept as it is.)"""
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if eos and eos_id is not None and any(turn.output is not None and eos in turn.output and eos_id in
                                          tokenizer(turn.output, add_special_tokens=False)["input_ids"] for turn in turns):
        raise TemplateError(f"an answer holds the tokenizer's eos token {eos!r}, which it encodes as eos itself: the "
                            "model would learn to end the answer there, and chat would cut it short; take it out of "
                            "the answers (or write it otherwise)")


def encode(tokenizer, template: str | None, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for `turns`, untrained tokens labelled IGNORE (Note: tokens of the
    whole text)."""
    check_template(template, tokenizer)
    ids, labels = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    if template is not None and TEMPLATES[template].bos and bos is not None:
        ids.append(bos)
        labels.append(IGNORE)
    pieces = segments(tokenizer, template, turns)
    if not getattr(tokenizer, "is_fast", False):  # no offsets: segment by segment
        for text, trained in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels
    spans, at = [], 0  # character ranges of the trained segments
    for text, trained in pieces:
        if trained:
            spans.append((at, at + len(text)))
        at += len(text)
    whole = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False, return_offsets_mapping=True)
    for token, (start, end) in zip(whole["input_ids"], whole["offset_mapping"]):
        trained = any(start < b and (end > a if end > start else start >= a) for a, b in spans)
        ids.append(token)
        labels.append(token if trained else IGNORE)
    return ids, labels


PROBE = "\u2063lowrank-probe\u2063"  # an answer no template rewrites, to find what surrounds answers


def _probe(tokenizer) -> tuple[str, str] | None:
    """(generation prompt, whole text) of a one-turn conversation answered with PROBE, rendered by
    the tokenizer's own template; None when the template refuses it or rewrites the answer."""
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: the callers fall back
        return None
    return (prompt, full) if PROBE in full else None


def answer_lead(tokenizer, template: str | None) -> str:
    """The whitespace a template writes between the assistant's opening and the answer (plain's
    space; Llama 2's " " after [/INST]), which the model writes first when it answers."""
    if template is not None:
        return TEMPLATES[template].answer.split("{output}")[0]
    probe = _probe(tokenizer)
    if probe is None or not probe[1].startswith(probe[0]):
        return ""
    prompt, full = probe
    lead = full[len(prompt):full.index(PROBE)]
    return lead if not lead.strip() else ""


def stop_text(tokenizer, template: str | None) -> str | None:
    """The text that ends an answer (generation stops there; the eos token always does too).
    A named template's end mark; for the tokenizer's own template, the special token it writes
    right after an answer (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>),
    else its first line of text after the answer, else the eos token."""
    if template is not None:
        end = TEMPLATES[template].end
        return end.strip() or end
    eos = getattr(tokenizer, "eos_token", None)
    probe = _probe(tokenizer)
    if probe is None:
        return eos
    text = probe[1]
    tail = text[text.index(PROBE) + len(PROBE):].lstrip()
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []
    if first and first[0] in tokenizer.added_tokens_decoder:
        return str(tokenizer.added_tokens_decoder[first[0]])
    return tail.split("\n")[0].strip() or eos
