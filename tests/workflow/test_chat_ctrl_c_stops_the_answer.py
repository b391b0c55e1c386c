"""Ctrl-C while `lowrank chat` streams an answer stops that answer and the chat goes on (a
runaway answer was stoppable only by killing the chat, with a Python traceback and the history
lost); the stopped exchange is not kept. At the prompt, Ctrl-C still leaves."""

import io

from lowrank.workflow import chat
from lowrank.workflow.data import Turn
from lowrank.workflow.generate import Settings


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(monkeypatch):
    def fake_stream(model, tokenizer, template, history, message, system, settings):
        yield "Once upon a time, "
        if message == "Tell me a long story.":
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of generation
        yield "the end."

    monkeypatch.setattr(chat, "stream", fake_stream)
    messages = iter(["Tell me a long story.", "A short one, then."])

    def read(prompt):
        try:
            return next(messages)
        except StopIteration:
            raise EOFError from None  # end of input

    out = io.StringIO()
    history = chat.loop(None, None, "chatml", Settings(), read=read, out=out)
    assert history == [Turn(input="A short one, then.", output="Once upon a time, the end.")]
    text = out.getvalue()
    assert "Once upon a time, \n(answer stopped; the exchange is not kept in the history)\n" in text
    assert text.endswith("Once upon a time, the end.\n\n")  # the answer, then end of input


def test_ctrl_c_at_the_prompt_leaves(monkeypatch):
    def interrupted(prompt):
        raise KeyboardInterrupt

    assert chat.loop(None, None, "chatml", Settings(), read=interrupted, out=io.StringIO()) == []
