"""Sampled chat (--temperature > 0) on a GPU: the logits are CUDA tensors and the sampling
generator a CPU one, which torch.multinomial refuses ("Expected a 'cuda' device type for
generator but found 'cpu'"), so every sampled answer on the default device crashed the chat.
The draw is made on the CPU: the same seed picks the same token on either device."""

import pytest
import torch

from lowrank.workflow.generate import Settings, _pick


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU case cannot mismatch)")
def test_sampling_cuda_logits_draws_as_on_the_cpu():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    s = Settings(temperature=0.8, top_k=20, top_p=0.9, seed=3)
    on_cpu = [_pick(logits, s, g) for g in [torch.Generator().manual_seed(3)] for _ in range(20)]
    on_gpu = [_pick(logits.cuda(), s, g) for g in [torch.Generator().manual_seed(3)] for _ in range(20)]
    assert on_gpu == on_cpu

