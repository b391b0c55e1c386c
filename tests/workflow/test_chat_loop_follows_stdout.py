"""lowrank.workflow.chat.loop writes to sys.stdout as it is when called. Its default was bound
at import (`out=sys.stdout` in the signature), so a redirection made afterwards
(contextlib.redirect_stdout, a test's capture) was not followed: the chat wrote to the stream of
import time, a closed one after an earlier capture had ended."""

import contextlib
import io

from lowrank.workflow import chat


def test_the_chat_writes_to_the_stdout_of_the_call():
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        history = chat.loop(model=None, tokenizer=None, template=None, settings=None, read=lambda prompt: "/exit")
    assert history == []
    assert captured.getvalue() == f"lowrank chat ({chat.HELP})\n"
