"""Seeded randomness: a host stream for initialisation, and counter-based bits for dropout.

Weights are drawn on the host (a NumPy generator) and moved to the device, so a seeded model
starts from the same weights on the CPU and the GPU. Dropout masks are not drawn at all: they
are a pure function of (seed, step, layer, element), Philox4x32-10 (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC11; as in cuRAND and Random123), computed here with
NumPy (or CuPy, written against `xp`) and on the GPU by kernels/random.cu, bit for bit alike.
The bits of element i of dropout layer L at training step s under seed k are word i % 4 of
philox4x32_10(counter=(i // 4, s, L, draw), key=(k mod 2^32, k // 2^32 mod 2^32)); draw counts
the layer's forwards since the last set_step or manual_seed (0 when it runs once per step, as in
fit and parity).

What a run's randomness is at a moment (the generator, the key k, the step s, each layer's draw
count, and during a CUDA graph's capture the device array the kernels read s from) is one
explicit object, a RandomState, rather than five module variables that the dropout layer, the
GPU backend and the graph code each read on their own: `current()` is the one way to reach it
(a Dropout's forward asks it for the layer's stream, CupyOps for the step's device array, the
graph code for the step), and `using(state)` is the one place it changes, for a block. The
functions below (manual_seed, set_step, current_step, seed_key, step_from_device, get_state,
set_state) act on the current one, so callers that only seed or set the step, `fit` and
`gpunet parity`, need not hold it.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy

# Philox4x32-10's constants (Random123's PHILOX_M4x32_0/1 and PHILOX_W32_0/1)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK_BITS = 24  # a dropout keep test compares the top 24 bits of a word with dropout_threshold(p)


class RandomState:
    """The randomness of a run: the initialisation generator, the dropout key (the seed modulo
    2^64), the training step whose masks are drawn, how many times each dropout layer has drawn
    since the last seed or step, and step_source: None, or while a CUDA graph captures a step the
    one-element uint32 device array its dropout kernels read the step from."""

    def __init__(self, seed: int = 0):
        self.step = 0
        self.step_source = None
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.generator = numpy.random.default_rng(seed)
        self.key = int(seed) % 2**64
        self._draws = weakref.WeakKeyDictionary()  # layer -> forwards since (a dropped model is forgotten)

    def set_step(self, step: int) -> None:
        self.step = int(step)
        self._draws.clear()  # each layer's masks start again from draw 0

    def dropout_stream(self, layer) -> tuple:
        """(key, step, layer.stream, draw) for layer's next forward: a layer run twice in a step
        gets a new mask each time."""
        draw = self._draws.get(layer, 0)
        self._draws[layer] = draw + 1
        return self.key, self.step, layer.stream, draw


_current = RandomState()  # the one current state: read through current(), replaced only by using()


def current() -> RandomState:
    return _current


@contextlib.contextmanager
def using(state: RandomState):
    """Make state the current one inside the block (a run that keeps its randomness apart)."""
    global _current
    previous, _current = _current, state
    try:
        yield state
    finally:
        _current = previous


def manual_seed(seed: int) -> None:
    """Seed the generator used for weight initialisation and the key of dropout masks."""
    current().seed(seed)


def seed_key() -> int:
    """The key of dropout masks (the last manual_seed, modulo 2^64)."""
    return current().key


def set_step(step: int) -> None:
    """The training step whose dropout masks the next forwards use (fit and parity set it)."""
    current().set_step(step)


def current_step() -> int:
    return current().step


@contextlib.contextmanager
def step_from_device(source):
    """Dropout kernels launched inside read their step from source (a one-element uint32 device
    array) rather than taking current_step() as an argument: a CUDA graph replays its captured
    arguments, so the graph writes each replay's step into source (gpunet.training.cuda_graph)."""
    state = current()
    state.step_source = source
    try:
        yield
    finally:
        state.step_source = None


def philox4x32_10(counter, key, xp=numpy):
    """Philox4x32-10 of counters (4 uint32 arrays or ints, broadcast together) under key (2 uint32
    ints): the 4 uint32 output words, as arrays. The 32x32-bit products are taken in uint64 and
    split into their high and low words."""
    c = [xp.asarray(w, dtype=xp.uint32) for w in counter]
    c = list(xp.broadcast_arrays(*c)) if len(set(w.shape for w in c)) > 1 else c
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    m0, m1 = xp.uint64(PHILOX_M[0]), xp.uint64(PHILOX_M[1])
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF, (k1 + PHILOX_W[1]) & 0xFFFFFFFF
        p0 = c[0].astype(xp.uint64) * m0
        p1 = c[2].astype(xp.uint64) * m1
        hi0, lo0 = (p0 >> xp.uint64(32)).astype(xp.uint32), p0.astype(xp.uint32)
        hi1, lo1 = (p1 >> xp.uint64(32)).astype(xp.uint32), p1.astype(xp.uint32)
        c = [hi1 ^ c[1] ^ xp.uint32(k0), lo1, hi0 ^ c[3] ^ xp.uint32(k1), lo0]
    return c


def dropout_threshold(p: float) -> int:
    """An element is kept when the top MASK_BITS bits of its word are >= this: probability 1 - p
    (to 2^-24), by an integer comparison, the same on every device."""
    return int(round(p * 2**MASK_BITS))


MAX_DROPOUT_ELEMENTS = 2**34  # 4 words per counter, and the counter's block index is 32 bits


def dropout_keep(size: int, p: float, stream: tuple, xp=numpy):
    """Whether each of `size` elements is kept, for stream (seed key, step, layer, draw): bool array."""
    if size >= MAX_DROPOUT_ELEMENTS:
        raise ValueError(f"dropout: {size} elements is over the {MAX_DROPOUT_ELEMENTS} one mask can cover")
    key, step, layer, draw = stream
    blocks = xp.arange(-(-size // 4), dtype=xp.uint32)
    words = philox4x32_10((blocks, step & 0xFFFFFFFF, layer & 0xFFFFFFFF, draw & 0xFFFFFFFF),
                          (key & 0xFFFFFFFF, key >> 32), xp)
    bits = xp.stack(words, axis=1).reshape(-1)[:size]  # element i: word i % 4 of block i // 4
    return (bits >> xp.uint32(32 - MASK_BITS)) >= xp.uint32(dropout_threshold(p))


def generator() -> numpy.random.Generator:
    return current().generator


def get_state() -> dict:
    """The generator's state and the dropout key as plain JSON-able data (for exact resume; the
    step is the loop's own, saved with it)."""
    rng = current()
    return {**rng.generator.bit_generator.state, "dropout_key": rng.key}


def set_state(state: dict) -> None:
    rng, state = current(), dict(state)
    rng.key = int(state.pop("dropout_key", rng.key))  # (a run saved before dropout had a key keeps the current one)
    rng.generator.bit_generator.state = state
