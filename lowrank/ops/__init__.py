"""Kernels as torch.library ops (lowrank::*), with one table choosing a backend per device."""

from . import backends
