"""Batch normalisation (1d and 2d) and layer normalisation, PyTorch names and semantics."""
from __future__ import annotations

import numpy

from gpunet.backend import Array, ops_for
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_float_input, check_last_dim, check_ndim


class _BatchNorm(Layer):
    """Normalise each channel (axis 1) with batch statistics in training and running
    statistics in eval; running_var tracks the unbiased batch variance, as in torch."""

    ndims: tuple[int, ...] = ()
    layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__(num_features=num_features, eps=eps, momentum=momentum, affine=affine)
        self.eps, self.momentum = eps, momentum
        if affine:
            self.add_param("weight", numpy.ones(num_features, dtype="float32"))
            self.add_param("bias", numpy.zeros(num_features, dtype="float32"))
        self.buffers["running_mean"] = numpy.zeros(num_features, dtype="float32")
        self.buffers["running_var"] = numpy.ones(num_features, dtype="float32")
        self.buffers["num_batches_tracked"] = numpy.zeros((), dtype="int64")

    def forward(self, x: Array) -> Array:
        check_ndim(self, x, self.ndims, self.layout)
        if x.shape[1] != self.config["num_features"]:
            raise ValueError(f"{self.describe()}: expected {self.config['num_features']} channels on axis 1, "
                             f"got shape {tuple(x.shape)}")
        check_float_input(self, x, self.buffers["running_mean"].dtype)
        ops = ops_for(x, op=f"{type(self).__name__}.forward")
        if self.training and x.size // x.shape[1] < 2:
            raise ValueError(f"{self.describe()}: training needs more than one value per channel, got shape {tuple(x.shape)}")
        b = self.buffers
        y, xhat, rstd = ops.batch_norm(x, self.params.get("weight"), self.params.get("bias"), b["running_mean"],
                                       b["running_var"], b["num_batches_tracked"], self.training, self.momentum,
                                       self.eps)
        self.save_for_backward(xhat=xhat, rstd=rstd, training=self.training)
        return y

    def backprop(self, dy, saved, need_dx):
        ops = ops_for(dy, op=f"{type(self).__name__}.backward")
        affine = "weight" in self.params
        return ops.batch_norm_backward(dy, saved.xhat, saved.rstd, self.params.get("weight"),
                                       self.grads["weight"] if affine else None, self.grads["bias"] if affine else None,
                                       saved.training)


@register("BatchNorm1d")
class BatchNorm1d(_BatchNorm):
    ndims = (2, 3)
    layout = "(N, C) or (N, C, L)"


@register("BatchNorm2d")
class BatchNorm2d(_BatchNorm):
    ndims = (4,)
    layout = "(N, C, H, W)"


@register("LayerNorm")
class LayerNorm(Layer):
    """Normalise over the last axis of size d, with weight (d,) and bias (d,)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True):
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"LayerNorm: only the last axis can be normalised, got {normalized_shape}")
            normalized_shape = int(normalized_shape[0])
        super().__init__(normalized_shape=normalized_shape, eps=eps, elementwise_affine=elementwise_affine)
        self.eps = eps
        if elementwise_affine:
            self.add_param("weight", numpy.ones(normalized_shape, dtype="float32"))
            self.add_param("bias", numpy.zeros(normalized_shape, dtype="float32"))

    def forward(self, x: Array, for_product: bool = False) -> Array:
        """for_product: only a matrix product reads the output (a Dense, attention's projection), so in mixed
        precision it is given as its 16-bit copy, which the product multiplies and keeps (Ops.layer_norm)."""
        check_last_dim(self, x, self.config["normalized_shape"])
        ops = ops_for(x, op="LayerNorm.forward")
        y, xhat, rstd = ops.layer_norm(x, self.params.get("weight"), self.params.get("bias"), self.eps, for_product)
        self.save_for_backward(xhat=xhat, rstd=rstd)
        return y

    def forward_add(self, x: Array, residual: Array, for_product: bool = False) -> tuple[Array, Array]:
        """(x + residual, forward(x + residual)) in one pass (one launch on a GPU): a residual
        connection followed by this norm, as in TransformerBlock. The backward is forward's."""
        check_last_dim(self, x, self.config["normalized_shape"])
        if residual.shape != x.shape:
            raise ValueError(f"{self.describe()}: residual of shape {tuple(residual.shape)} for an input of shape "
                             f"{tuple(x.shape)}")
        ops = ops_for(x, residual, op="LayerNorm.forward_add")
        total, y, xhat, rstd = ops.add_layer_norm(x, residual, self.params.get("weight"), self.params.get("bias"),
                                                  self.eps, for_product)
        self.save_for_backward(xhat=xhat, rstd=rstd)
        return total, y

    def backward_add(self, dy: Array, residual: Array) -> Array:
        """residual + backward(dy) in one pass (one launch on a GPU): the gradient of a residual
        stream that this norm's branch left, as in TransformerBlock."""
        return self._backward(dy, self.saved, residual)

    def backprop(self, dy, saved, need_dx):
        return self._backward(dy, saved, None)

    def _backward(self, dy, saved, residual):
        ops = ops_for(dy, op="LayerNorm.backward")
        # the parameters' gradients are written straight into grads (views of the flat gradient buffer)
        dx, _, _ = ops.layer_norm_backward(dy, saved.xhat, saved.rstd, self.params.get("weight"),
                                           self.grads.get("weight"), self.grads.get("bias"), residual)
        return dx
