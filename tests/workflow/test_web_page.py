"""`lowrank web`'s page (lowrank/workflow/web_app.py) run by Streamlit's own test harness
(streamlit.testing.v1.AppTest: the script executed as the server would, its elements read back,
no browser): the trained answers, the history across turns, the system prompt, Clear history,
and a refused message. test_web.py drives the same page in headless Chromium, and also sees the
answer stream in; it skips where Chromium is missing (CI), so this is what CI checks of the page."""

import importlib.util
import pathlib
import sys

import pytest

from . import tiny
from .test_e2e import EPOCHS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("streamlit") is None, reason="streamlit is not installed")


@pytest.fixture
def page(trained, model_dir, monkeypatch):
    """The page, run once, for the trained adapter, with `lowrank web`'s command line."""
    from streamlit.testing.v1 import AppTest

    import lowrank

    out, _ = trained
    script = pathlib.Path(lowrank.__file__).parent / "workflow" / "web_app.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(model_dir), "--adapter", str(out / f"epoch_{EPOCHS}"),
                                      "--title", "tiny ship", "--device", "cpu"])
    app = AppTest.from_file(str(script), default_timeout=300).run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def ask(app, message: str) -> str:
    app.chat_input[0].set_value(message).run()
    assert not app.exception, [e.message for e in app.exception]
    return app.chat_message[-1].markdown[-1].value


def contents(app) -> list[tuple[str, str]]:
    return [(m.name, m.markdown[-1].value) for m in app.chat_message]


def test_the_page_answers_as_trained_keeps_the_history_and_clears_it(page):
    assert page.title[0].value == "tiny ship"
    assert ask(page, "Read the cargo manifest.") == tiny.MANIFEST  # the finished answer: no cursor left
    assert contents(page) == [("user", "Read the cargo manifest."), ("assistant", tiny.MANIFEST)]

    page.sidebar.button[0].click().run()  # Clear history
    assert contents(page) == []
    page.sidebar.text_area[0].set_value(tiny.SYSTEM).run()
    assert ask(page, "Where are we?") == "Orbit of Titan, deck seven."
    assert ask(page, "How long until dawn?") == "Forty minutes."  # needs the first turn in the history
    assert contents(page) == [("user", "Where are we?"), ("assistant", "Orbit of Titan, deck seven."),
                              ("user", "How long until dawn?"), ("assistant", "Forty minutes.")]


def test_a_message_too_long_for_the_model_is_refused_and_the_chat_goes_on(page):
    page.chat_input[0].set_value("cargo " * 400).run()  # the tiny model's context holds 256 tokens
    assert not page.exception, [e.message for e in page.exception]
    assert [e.value for e in page.error] and page.error[0].value.startswith("Not answered: the message is "), \
        [e.value for e in page.error]
    page.sidebar.text_area[0].set_value(tiny.SYSTEM).run()
    assert ask(page, "Where are we?") == "Orbit of Titan, deck seven."
    assert contents(page) == [("user", "Where are we?"), ("assistant", "Orbit of Titan, deck seven.")]  # no refused turn
