"""The Streamlit page behind `lowrank web` (run by `streamlit run`, never imported by lowrank).

    streamlit run web_app.py -- MODEL [--adapter DIR] [--dtype D]

Sidebar: system prompt, generation settings, a button that clears the history. Main: the
chat, answers streamed into the page token by token (the seed notes' web_demo.py, on lowrank).
"""

from __future__ import annotations

import argparse
import sys
import threading

import streamlit as st

from lowrank.workflow.data import Turn
from lowrank.workflow.generate import Settings, stream
from lowrank.workflow.model import load_with_adapter


def _args(argv):
    p = argparse.ArgumentParser(prog="lowrank web (page)")
    p.add_argument("model")
    p.add_argument("--adapter")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--title", default="lowrank chat")
    p.add_argument("--allow-other-base", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true")
    return p.parse_args(argv)


@st.cache_resource
def _load(model: str, adapter: str | None, dtype: str, device: str, allow_other_base: bool, trust_remote_code: bool,
          allow_pickle: bool):
    return load_with_adapter(model, adapter, dtype, device, allow_other_base=allow_other_base,  # once per server,
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)  # shared by every session


@st.cache_resource
def _one_at_a_time() -> threading.Lock:
    """Streamlit runs each session in a thread of its own, and every session shares the one
    model: one answer at a time. LoRA on a model's parameters (MoE experts) swaps tensors on the
    module for a call (docs/lora.md), which two threads at once would see."""
    return threading.Lock()


def main(argv) -> None:
    args = _args(argv)
    model, tokenizer, template = _load(args.model, args.adapter, args.dtype, args.device, args.allow_other_base,
                                       args.trust_remote_code, args.allow_pickle)
    st.title(args.title)
    with st.sidebar:
        system = st.text_area("System prompt", value="", key="system")
        settings = Settings(max_new_tokens=st.slider("Max new tokens", 1, 2048, 256),
                            temperature=st.slider("Temperature", 0.0, 2.0, 0.0, 0.05),
                            top_p=st.slider("Top p", 0.05, 1.0, 1.0, 0.05),
                            top_k=st.number_input("Top k (0: off)", 0, 1000, 0))
        if st.button("Clear history"):
            st.session_state.turns = []
    turns: list[Turn] = st.session_state.setdefault("turns", [])
    for turn in turns:
        st.chat_message("user").markdown(turn.input)
        st.chat_message("assistant").markdown(turn.output)
    message = st.chat_input("Say something")
    if message:
        st.chat_message("user").markdown(message)
        with st.chat_message("assistant"):
            box, answer = st.empty(), ""
            try:
                with _one_at_a_time():
                    for piece in stream(model, tokenizer, template, turns, message, system or None, settings):
                        answer += piece
                        box.markdown(answer + "▌")
            except ValueError as e:  # too long for the context, refused by the template: say so, keep the chat
                box.error(f"Not answered: {e}")
                return
            box.markdown(answer)
        turns.append(Turn(input=message, output=answer))


main(sys.argv[1:])
