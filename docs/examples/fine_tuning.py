"""Fine-tuning a loaded model: its layers reused under a new head, the first frozen, the second trained at a
tenth of the rate (docs/layers.md shows this file; the test suite runs it: tests/layers/test_graph_docs.py)."""
import tempfile
from pathlib import Path

import numpy

import gpunet as gn

L = gn.layers
rng = numpy.random.default_rng(0)


def quiet(*args):  # gn.fit's log: this example prints its own lines
    pass


# A model trained on one task (five classes), saved.
x = gn.Input((20,))
h = L.ReLU()(L.Dense(32, 32, name="body2")(L.ReLU()(L.Dense(20, 32, name="body1")(x))))
pretrained = gn.Model(x, L.Dense(32, 5, name="head")(h))
features = rng.standard_normal((600, 20)).astype("float32")
gn.fit(pretrained, (features, features[:, :5].argmax(axis=1)), optimizer=gn.optim.Adam(pretrained, lr=1e-2),
       steps=50, batch_size=64, progress=False, log=quiet)
path = gn.save(pretrained, Path(tempfile.mkdtemp()) / "pretrained.safetensors")

# Loaded, its body reused under a new head for another task (three classes).
loaded = gn.load(path)
x = gn.Input((20,))
h = L.ReLU()(loaded["body2"](L.ReLU()(loaded["body1"](x))))  # the loaded layers, weights and all
tuned = gn.Model(x, L.Dense(32, 3, name="new_head")(h))
tuned["body1"].freeze()  # not updated: no gradient computed, no momentum, no weight decay
optimizer = gn.optim.Adam(tuned, lr=1e-2, groups={"body2.*": {"lr": 1e-3}})  # body2 at a tenth of the rate
before = {name: numpy.array(value) for name, value in tuned.params.items()}
gn.fit(tuned, (features, features[:, 5:8].argmax(axis=1)), optimizer=optimizer, steps=30, batch_size=64,
       progress=False, log=quiet)
moved = {name: float(numpy.abs(value - before[name]).max()) for name, value in tuned.params.items()}
print(f"body1 moved {moved['body1.weight']:.0e}, body2 {moved['body2.weight']:.0e}, new head {moved['new_head.weight']:.0e}")
