"""Turning conversations into text and tokens, the same way for training and for chat.

A conversation becomes a list of segments `(text, trained)`: the prompt part of each turn
(system, user message, the assistant's opening) is not trained; the answer and the marks
that close it are. Tokens of a segment are trained exactly when the segment is, so the loss
counts the `output` tokens (and the end-of-answer mark, so the model learns to stop) only.

The text comes from the tokenizer's own chat template when it has one (`template=None`), or
from a named template in TEMPLATES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .data import Turn

IGNORE = -100  # label of an untrained token: torch.nn.functional.cross_entropy's ignore_index


class TemplateError(ValueError):
    """A template that cannot render a conversation the way training needs."""


@dataclasses.dataclass(frozen=True)
class NamedTemplate:
    """A chat format as four pieces of text around the turns."""

    system: str  # "{system}" is replaced by the system prompt
    user: str  # "{input}" is replaced by the user's message; ends with the assistant's opening
    end: str  # after each answer; generation stops when the model writes it
    bos: bool = True  # start the text with the tokenizer's bos token, when it has one


TEMPLATES = {
    # ChatML (Qwen, many others)
    "chatml": NamedTemplate("<|im_start|>system\n{system}<|im_end|>\n",
                            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"),
    # InternLM-Chat, the model of the seed notes (XTuner's `internlm_chat` template)
    "internlm": NamedTemplate("<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>\n"),
    # no markup beyond two labels: for tokenizers without special tokens
    "plain": NamedTemplate("{system}\n\n", "User: {input}\nAssistant: ", "\n\n", bos=False),
}


def check_template(template: str | None, tokenizer=None) -> None:
    """Raise TemplateError unless `template` names a template that exists for `tokenizer`."""
    if template is None:
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"the tokenizer has no chat template; set template to one of {sorted(TEMPLATES)}")
    elif template not in TEMPLATES:
        raise TemplateError(f"template must be null (the tokenizer's own) or one of {sorted(TEMPLATES)}; got {template!r}")


def _named(t: NamedTemplate, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    out = []
    for turn in turns:
        prompt = (t.system.format(system=turn.system) if turn.system else "") + t.user.format(input=turn.input)
        out.append((prompt, False))
        if turn.output is not None:
            out.append((turn.output + t.end, True))
    return out


def _own(tokenizer, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """Segments from the tokenizer's chat template, rendering one message more each time:
    what a message adds to the text is its segment."""
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    out, messages, done = [], [], ""
    for i, turn in enumerate(turns):
        if turn.system:
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
            raise TemplateError(f"the tokenizer's chat template does not end turn {i}'s prompt with the assistant's "
                                f"opening (add_generation_prompt); use a named template ({sorted(TEMPLATES)})")
        answer = full[len(prompt):]
        opening = answer[:max(answer.find(turn.output), 0)]
        if opening.strip():  # the template ignores add_generation_prompt: its opening would be trained, and absent in chat
            raise TemplateError(f"the tokenizer's chat template ignores add_generation_prompt: turn {i}'s assistant "
                                f"opening {opening!r} is not in the prompt, so training would learn it and chat would "
                                f"not give it; use a named template ({sorted(TEMPLATES)})")
        out.append((answer, True))
        done = full
    return out


def segments(tokenizer, template: str | None, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of `turns`. A last turn whose output is None ends with the
    assistant's opening: the prompt to generate from."""
    check_template(template, tokenizer)
    if template is None:
        return _own(tokenizer, turns)
    return _named(TEMPLATES[template], turns)


def encode(tokenizer, template: str | None, turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for `turns`: each segment tokenized on its own (so training and
    chat cut the text at the same places) and untrained tokens labelled IGNORE."""
    check_template(template, tokenizer)
    ids, labels = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    if template is not None and TEMPLATES[template].bos and bos is not None:
        ids.append(bos)
        labels.append(IGNORE)
    for text, trained in segments(tokenizer, template, turns):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def stop_text(tokenizer, template: str | None) -> str | None:
    """The text that ends an answer (generation stops there); None: the eos token alone."""
    if template is None:
        return getattr(tokenizer, "eos_token", None)
    return TEMPLATES[template].end.strip() or None
