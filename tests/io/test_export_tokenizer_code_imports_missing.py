"""Export copies the base's tokenizer code with the modules it imports relatively. A relative
import of a module the directory does not hold (an optional one in a try block, `from ..x`, a
package) or a module file that is not UTF-8 made transformers' get_relative_import_files raise,
and the whole export (lowrank merge, after the merge) failed with FileNotFoundError /
UnicodeDecodeError. Such imports are skipped; the modules that are here are still copied."""

from __future__ import annotations

import json
import types

import pytest

pytest.importorskip("transformers")

from lowrank import export_files  # noqa: E402


def test_imports_of_modules_not_here_are_skipped(tmp_path):
    src, out = tmp_path / "base", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}}))
    (src / "tokenization_x.py").write_text(
        "from .vocab_x import V\ntry:\n    from .fast_extra import F\nexcept ImportError:\n    F = None\n\nclass X: ...\n")
    (src / "vocab_x.py").write_text("from ..outside import Z\nfrom .words_x import W\nV = W\n")
    (src / "words_x.py").write_bytes("# caf\xe9 (latin-1)\nW = 1\n".encode("latin-1"))
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(src)))
    export_files.write_tokenizer(model, out, None)
    assert sorted(p.name for p in out.iterdir()) == ["tokenization_x.py", "tokenizer_config.json", "vocab_x.py",
                                                     "words_x.py"]
    assert (out / "words_x.py").read_bytes() == (src / "words_x.py").read_bytes()
