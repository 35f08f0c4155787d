"""Token embeddings (torch.nn.Embedding layout) and learned positional embeddings."""
from __future__ import annotations

from gpunet import init as initialisers
from gpunet.backend import Array, is_cupy_array, ops_for
from gpunet.backend.sequence_ops import position_backward
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_float_input, check_ndim
from gpunet.layers.recurrent import EmbeddedIds, _Recurrent


@register("Embedding")
class Embedding(Layer):
    """Integer ids (any shape) -> vectors (*shape, dim); weight (num_embeddings, dim).

    std: the weights start as N(0, std^2); 1.0 is torch.nn.Embedding's default.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0):
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"Embedding: sizes must be positive, got num={num_embeddings}, dim={embedding_dim}")
        super().__init__(num_embeddings=num_embeddings, embedding_dim=embedding_dim, std=std)
        self.add_param("weight", initialisers.normal((num_embeddings, embedding_dim), std))

    def forward(self, ids: Array) -> Array:
        return self._embed(ids, None)

    def absorbs(self, following) -> bool:
        """A PositionalEmbedding right after: both in one pass each way (one launch on a GPU).
        A recurrent layer right after: it projects each table row once, not each token's copy."""
        return len(following) == 1 and isinstance(following[0], (PositionalEmbedding, _Recurrent))

    def forward_absorbing(self, ids, following):
        (layer,) = following
        if isinstance(layer, PositionalEmbedding):
            return self._embed(ids, layer)
        w = self.params["weight"]
        if layer.takes_embedded(ids, w):
            self._check_ids(ids)
            y = layer.forward_embedded(ids, w)
        else:
            y = layer.forward(self._embed(ids, None))
        # Sequential marks the absorbed layer's own saved state; what its backward needs is kept here
        self.save_for_backward(ids=ids, positional=None, recurrent=(layer, layer.saved))
        return y

    def _check_ids(self, ids):
        w = self.params["weight"]
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{self.describe()}: expected integer ids, got {ids.dtype}")
        if not is_cupy_array(ids) and ids.size:  # on the GPU this check would stall the stream
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= w.shape[0]:
                raise ValueError(f"{self.describe()}: id {low if low < 0 else high} is out of range "
                                 f"[0, {w.shape[0]})")

    def _embed(self, ids, positional):
        w = self.params["weight"]
        ops = ops_for(ids, w, op="Embedding.forward")
        self._check_ids(ids)
        position = None
        if positional is not None:
            positional.check_input(ids.shape + (w.shape[1],))
            position = positional.params["weight"]
        self.save_for_backward(ids=ids, positional=positional)
        return ops.embed(ids, w, position)

    def backprop(self, dy, saved, need_dx):
        recurrent = getattr(saved, "recurrent", None)
        if recurrent is not None:  # the absorbed recurrent layer's backward first
            layer, layer_saved = recurrent
            if isinstance(layer_saved.xs, EmbeddedIds):
                layer.backprop_embedded(dy, layer_saved, self.grads["weight"])
                return None
            dy = layer.backprop(dy, layer_saved, need_dx=True)
        ops = ops_for(dy, self.params["weight"], op="Embedding.backward")
        if saved.positional is None:
            ops.embedding_backward(saved.ids, dy, self.grads["weight"])
        else:  # the absorbed PositionalEmbedding's gradient too
            ops.embed_backward(saved.ids, dy, self.grads["weight"], saved.positional.grads["weight"])
        return None  # ids have no gradient


@register("PositionalEmbedding")
class PositionalEmbedding(Layer):
    """Adds a learned vector per position to (B, T, dim) inputs; weight (max_len, dim)."""

    def __init__(self, max_len: int, embedding_dim: int, std: float = 0.02):
        super().__init__(max_len=max_len, embedding_dim=embedding_dim, std=std)
        self.add_param("weight", initialisers.normal((max_len, embedding_dim), std))

    def forward(self, x: Array) -> Array:
        check_ndim(self, x, (3,), "(B, T, dim)")
        check_float_input(self, x, self.params["weight"].dtype)
        self.check_input(x.shape)
        self.save_for_backward()  # the positions used are dy's
        return x + self.params["weight"][: x.shape[1]]

    def check_input(self, shape) -> None:
        """Refuse an input (also an absorbing Embedding's output) of more positions than max_len,
        or of another size."""
        w = self.params["weight"]
        if len(shape) != 3 or shape[1] > w.shape[0] or shape[2] != w.shape[1]:
            raise ValueError(f"{self.describe()}: input of shape {tuple(shape)} needs at most {w.shape[0]} "
                             f"positions of size {w.shape[1]}")

    def backprop(self, dy, saved, need_dx):
        position_backward(dy, self.grads["weight"])
        return dy
