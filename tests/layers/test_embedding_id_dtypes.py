"""Embedding ids of every integer dtype, on every device: the range check must not invent an error.

The GPU's xp fallback (float64 weights) folds ids outside [0, vocabulary) into device flags with
xp.where(bad, ids, 2**63 - 1); on int32/uint8 ids NumPy (and so the stand-in) wrapped that bound
to -1 and reported a spurious "id -1 is out of range" for ids that were all valid (issue 27).
"""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from tests.support.arrays import on

ID_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]


def _model(device, dtype):
    return gn.Sequential(gn.layers.Embedding(6, 4), gn.layers.Dense(4, 6)).to(device, dtype)


def _loss(model, device, ids) -> float:
    logits = model.forward(on(device, ids))
    loss, _ = gn.losses.softmax_cross_entropy(logits.reshape(-1, 6), on(device, numpy.zeros(ids.size, "int64")))
    return gn.losses.item(loss)  # where the GPU raises what it flagged


@pytest.mark.parametrize("weights", ["float32", "float64"])  # the GPU's embedding kernel, and its xp fallback
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_valid_ids_of_every_integer_dtype_embed_the_rows_without_an_error(device, id_dtype, weights):
    model = _model(device, weights)
    ids = numpy.array([[0, 5, 3], [2, 1, 4]], dtype=id_dtype)
    expected = gn.to_numpy(model.layers[0].params["weight"])[ids.astype("int64")]
    numpy.testing.assert_array_equal(gn.to_numpy(model.layers[0].forward(on(device, ids))), expected)
    assert numpy.isfinite(_loss(model, device, ids))  # before the fix: "id -1 is out of range [0, 6)"


@pytest.mark.parametrize("weights", ["float32", "float64"])
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_an_id_past_the_vocabulary_is_named_for_every_integer_dtype(device, id_dtype, weights):
    model = _model(device, weights)
    bad = numpy.array([[0, 5, 3], [2, 9, 4]], dtype=id_dtype)
    with pytest.raises(ValueError, match=r"Embedding.*: id 9 is out of range \[0, 6\)"):
        _loss(model, device, bad)
    assert numpy.isfinite(_loss(model, device, bad.clip(0, 5)))  # reported once; the next valid step reads cleanly


@pytest.mark.parametrize("id_dtype", ["int8", "int16", "int32", "int64"])
def test_a_negative_id_is_named_for_every_signed_dtype(device, id_dtype):
    model = _model(device, "float64")
    with pytest.raises(ValueError, match=r"Embedding.*: id -3 is out of range \[0, 6\)"):
        _loss(model, device, numpy.array([[0, -3, 3]], dtype=id_dtype))
