"""`lowrank chat`'s sampling (--temperature, --top-k, --top-p) draws from the distribution
transformers' warpers give, applied in generate's order: temperature, then top-k, then top-p
on what top-k kept (renormalized). Before, top-p measured its mass against the whole
vocabulary after top-k had removed part of it, so it kept tokens transformers drops."""

import pytest
import torch

from lowrank.workflow import generate
from lowrank.workflow.generate import Settings, _pick


def _transformers_probs(logits: torch.Tensor, s: Settings) -> torch.Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None].float()
    for warper in (TemperatureLogitsWarper(s.temperature), TopKLogitsWarper(s.top_k) if s.top_k else None,
                   TopPLogitsWarper(s.top_p) if s.top_p < 1 else None):
        if warper is not None:
            scores = warper(None, scores)
    return torch.softmax(scores, -1)[0]


def _drawn_from(logits: torch.Tensor, s: Settings, monkeypatch) -> torch.Tensor:
    """The probabilities _pick hands torch.multinomial."""
    seen = []

    def spy(probs, n, generator=None):
        seen.append(probs.clone())
        return torch.zeros(1, dtype=torch.long)

    monkeypatch.setattr(generate.torch, "multinomial", spy)
    _pick(logits, s, torch.Generator().manual_seed(0))
    return seen[0]


def test_top_p_after_top_k_keeps_what_transformers_keeps(monkeypatch):
    # p = (0.5, 0.3, 0.2); top-k 2 leaves (0.625, 0.375): top-p 0.6 is full after the first token
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    s = Settings(temperature=1.0, top_k=2, top_p=0.6)
    probs = _drawn_from(logits, s, monkeypatch)
    assert torch.nonzero(probs).flatten().tolist() == [0]
    assert torch.allclose(probs, _transformers_probs(logits, s), rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (0.7, 8, 0.5), (1.3, 20, 0.8),
                                                       (0.5, 3, 0.95)])
def test_sampling_distribution_is_transformers_own(temperature, top_k, top_p, monkeypatch):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 2
    s = Settings(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = _drawn_from(logits, s, monkeypatch)
    want = _transformers_probs(logits, s)
    assert torch.equal(probs > 0, want > 0)
    # float32 softmaxes of the same logits, renormalized once or twice: a few ulps apart
    assert torch.allclose(probs / probs.sum(), want, rtol=1e-5, atol=0)
