"""`lowrank chat MODEL [--adapter DIR]`: a terminal chat, answers streamed as they are made.

The prompt is built with the template the adapter was trained with (its lowrank_workflow.json),
so chat sees what training saw. Commands: /system TEXT sets the system prompt (and clears the
history), /clear forgets the history, /exit (or end of input) leaves. Ctrl-C during an answer
stops that answer (the exchange is not kept); at the prompt it leaves.
"""

from __future__ import annotations

import sys

from .data import Turn
from .generate import Settings, stream

PROMPT = ">>> "
HELP = "commands: /system TEXT, /clear, /exit"


def loop(model, tokenizer, template: str | None, settings: Settings, system: str | None = None,
         read=input, out=None) -> list[Turn]:
    """Read messages until /exit or end of input; returns the history. `out`: where answers go
    (None: sys.stdout as it is at the call, so a redirection made after import is followed)."""
    out = sys.stdout if out is None else out
    history: list[Turn] = []
    out.write(f"lowrank chat ({HELP})\n")
    while True:
        try:
            message = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        if not message.strip():
            continue
        if message.strip() == "/exit":
            return history
        if message.strip() == "/clear":
            history = []
            out.write("(history cleared)\n")
            continue
        command = message.strip()
        if command == "/system" or command.startswith(("/system ", "/system\t")):  # not "/systemd ..."
            system, history = command[len("/system"):].strip() or None, []
            out.write(f"(system prompt {'set' if system else 'removed'}; history cleared)\n")
            continue
        answer = ""
        try:
            for piece in stream(model, tokenizer, template, history, message, system, settings):
                answer += piece
                out.write(piece)
                out.flush()
        except ValueError as e:  # a message too long for the context, a template refusing it: the chat goes on
            out.write(f"(not answered: {e})\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops a long or looping answer, not the chat (it printed a traceback)
            out.write("\n(answer stopped; the exchange is not kept in the history)\n")
            continue
        out.write("\n")
        history.append(Turn(input=message, output=answer))
