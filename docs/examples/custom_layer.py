"""A layer of your own, checked with gn.testing.check_layer (docs/layers.md shows this file; the
test suite runs it: tests/test_check_layer.py)."""
import numpy
import torch

import gpunet as gn
from gpunet.backend import ops_for


@gn.layers.register("Swish")  # the name a saved checkpoint rebuilds the layer by
class Swish(gn.layers.Layer):
    """y = x * sigmoid(beta * x), with a learned beta per feature (the last axis)."""

    def __init__(self, features: int):
        super().__init__(features=features)
        self.add_param("beta", numpy.ones(features, dtype="float32"))

    def forward(self, x):
        beta = self.params["beta"]
        xp = ops_for(x, beta, op="Swish.forward").xp  # NumPy or CuPy, as x and beta are
        s = 1 / (1 + xp.exp(-beta * x))
        self.save_for_backward(x=x, s=s)
        return x * s

    def backprop(self, dy, saved, need_dx):
        x, s, beta = saved.x, saved.s, self.params["beta"]
        ds = dy * x * s * (1 - s)  # dy times y's derivative in (beta x); beta's is ds x, x's adds ds beta
        self.grads["beta"][...] = (ds * x).reshape(-1, x.shape[-1]).sum(axis=0)  # in place: see "Writing a layer"
        return dy * s + ds * beta if need_dx else None


rng = numpy.random.default_rng(0)
layer = Swish(4)
layer.params["beta"][...] = rng.uniform(0.5, 2.0, 4)  # away from the initial ones, so a swapped index shows
x = rng.standard_normal((8, 4)).astype("float32")
gn.testing.check_layer(layer, x)  # returns None, or raises AssertionError naming the wrong element
print("Swish: every gradient matches float64 finite differences")

# With a PyTorch twin: the same state_dict names and weights; outputs and gradients in float32 are compared too.
dense = gn.layers.Dense(4, 3)
linear = torch.nn.Linear(4, 3)
linear.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in dense.state_dict().items()})
gn.testing.check_layer(dense, x, torch_module=linear)
print("Dense: matches torch.nn.Linear")
