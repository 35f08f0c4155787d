"""One seeded random stream for initialisation and dropout, drawn on the host.

Drawing on the host and moving the result to the device gives the same numbers on the CPU and
on the GPU, so a seeded run follows the same trajectory on both.
"""
from __future__ import annotations

import numpy

_generator = numpy.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the generator used for weight initialisation and dropout masks."""
    global _generator
    _generator = numpy.random.default_rng(seed)


def generator() -> numpy.random.Generator:
    return _generator


def get_state() -> dict:
    """The generator's state as plain JSON-able data (for exact resume)."""
    return _generator.bit_generator.state


def set_state(state: dict) -> None:
    _generator.bit_generator.state = state
