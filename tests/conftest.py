"""Test-suite set-up: GPU marker, Triton's interpreter on CPU, hypothesis profiles."""

import os

# Triton kernels run in Triton's interpreter on CPU tensors when there is no GPU. This must
# be set before anything imports triton.
if os.environ.get("LOWRANK_TRITON_INTERPRET", "auto") == "auto":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Note: hypothesis profiles. "ci" is pinned (derandomized: the same examples every run) so
# CI is reproducible; "dev" explores new examples each run; "thorough" is for a long soak.
# Pick with HYPOTHESIS_PROFILE=dev|thorough.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=150, derandomize=True, **_common)
settings.register_profile("dev", max_examples=150, **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
