"""transformers' continuous batching (model.generate_batch) packs requests into one sequence over a
PagedAttentionCache, which counts no tokens per layer; the prefix cannot go in there. The error it
logs names the cache and what to use (before: AttributeError: 'PagedAttentionCache' object has no
attribute 'get_seq_length'). transformers catches the error per request and logs it."""

from __future__ import annotations

import pytest

import lowrank

from . import models

transformers = pytest.importorskip("transformers")


def test_generate_batch_names_the_paged_cache(capfd):
    model = models.llama().eval()
    lowrank.inject(model, lowrank.PrefixConfig(num_virtual_tokens=3))
    config = transformers.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(inputs=[[5, 6, 7], [8, 9]], generation_config=config)
    logged = capfd.readouterr().err  # its logger writes to stderr and does not propagate
    assert "prefix tuning needs a KV cache that counts its tokens; PagedAttentionCache does not" in logged
    assert "get_seq_length" not in logged
