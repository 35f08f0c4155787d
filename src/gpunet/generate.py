"""Sampling text from a character-level model (char_rnn or transformer).

Recurrent models carry their state from one character to the next; a transformer re-reads the
last `context` characters at each step. Sampling draws from a seeded NumPy generator on the
host, so a given model, prompt and seed give the same text on every run and device.
`stream` gives the text in pieces as it is sampled (what `gpunet generate` prints, flushed piece by
piece); `generate` joins them. A length is capped at MAX_LENGTH characters.
"""
from __future__ import annotations

import numpy

from gpunet import validate
from gpunet.backend import to_device, to_numpy
from gpunet.data.text import decode, encode
from gpunet.layers.embedding import PositionalEmbedding
from gpunet.layers.recurrent import _Recurrent

# The longest text one call samples: a million characters take minutes to hours (one forward pass
# each); a larger --length is a typo far more often than a wish.
MAX_LENGTH = 1_000_000
CHUNK = 64  # characters per piece that stream gives (and `gpunet generate` flushes)


def generate(model, prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 0) -> str:
    """The prompt followed by `length` sampled characters; temperature 0 picks the likeliest."""
    return "".join(stream(model, prompt, length, temperature, seed))


def stream(model, prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 0):
    """generate's text in pieces as it is sampled: the prompt with the first CHUNK characters, then
    CHUNK characters at a time. Everything is checked before the first piece."""
    spec = getattr(model, "preprocess", None) or {}
    if spec.get("kind") != "text":
        raise ValueError("generate needs a character-level model (trained with --model rnn or transformer); "
                         "this model has no text vocabulary")
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one character")
    validate.non_negative_int("generate: length", length, MAX_LENGTH)
    validate.finite("generate: temperature", temperature, low=0)
    validate.seed("generate: seed", seed)
    vocabulary = spec["vocabulary"]
    ids = list(encode(prompt, vocabulary))
    return _pieces(model, vocabulary, ids, length, temperature, seed)


def _pieces(model, vocabulary: str, ids: list, length: int, temperature: float, seed: int):
    rng = numpy.random.default_rng(seed)
    shown = 0  # the ids given out so far; the prompt goes with the first piece, so a model that
    was_training = model.training  # cannot sample (NaN outputs) fails before anything is printed
    model.eval()
    try:
        next_logits = _recurrent_sampler(model) or _window_sampler(model)
        for start in range(0, max(length, 1), CHUNK):
            for _ in range(min(CHUNK, length - start)):
                ids.append(_sample(next_logits(ids), temperature, rng))
            yield decode(ids[shown:], vocabulary)
            shown = len(ids)
    finally:
        model.train(was_training)


def _recurrent_sampler(model):
    if not any(isinstance(layer, _Recurrent) for layer in model.layers):
        return None
    states: dict = {}
    fed = 0

    def next_logits(ids):
        nonlocal fed
        x = to_device(numpy.asarray([ids[fed:]], dtype="int64"), model.device)
        fed = len(ids)
        for i, layer in enumerate(model.layers):
            if isinstance(layer, _Recurrent):
                x = layer.forward(x, states.get(i))
                states[i] = layer.final_state
            else:
                x = layer.forward(x)
        return to_numpy(x[0, -1])
    return next_logits


def _window_sampler(model):
    limits = [layer.config["max_len"] for layer in model.layers if isinstance(layer, PositionalEmbedding)]
    context = min(limits) if limits else None

    def next_logits(ids):
        window = ids[-context:] if context else ids
        x = to_device(numpy.asarray([window], dtype="int64"), model.device)
        return to_numpy(model.forward(x)[0, -1])
    return next_logits


def _sample(logits, temperature: float, rng: numpy.random.Generator) -> int:
    logits = logits.astype("float64")
    if not numpy.isfinite(logits).all():
        raise ValueError("the model's output holds NaN or Inf (are its weights finite?); nothing can be sampled")
    if temperature == 0:
        return int(logits.argmax())
    with numpy.errstate(over="ignore"):
        scaled = logits / temperature
    if not numpy.isfinite(scaled).all():  # a temperature so small it is greedy
        return int(logits.argmax())
    p = numpy.exp(scaled - scaled.max())
    cumulative = numpy.cumsum(p / p.sum())
    return int(min(numpy.searchsorted(cumulative, rng.random(), side="right"), len(p) - 1))
