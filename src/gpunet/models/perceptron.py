"""Rosenblatt's perceptron: a sign unit trained by the perceptron learning rule."""
from __future__ import annotations

import numpy

from gpunet.layers.base import Layer, register


@register("Perceptron")
class Perceptron(Layer):
    """y = sign(w . x + b) in {-1, +1}; params "weight" (1, in) and "bias" (1,).

    fit() applies the perceptron rule w += lr * y * x for each misclassified sample; on linearly
    separable data it stops after an epoch without mistakes (the convergence theorem).
    """

    def __init__(self, in_features: int):
        super().__init__(in_features=in_features)
        self.add_param("weight", numpy.zeros((1, in_features), dtype="float32"))
        self.add_param("bias", numpy.zeros(1, dtype="float32"))

    def forward(self, x):
        score = x @ self.params["weight"][0] + self.params["bias"][0]
        self.save_for_backward()
        return numpy.where(score >= 0, 1, -1).astype("int8")

    def backprop(self, dy, saved, need_dx):
        raise TypeError("Perceptron is trained by the perceptron rule (fit), not by backpropagation")

    def fit(self, x, y, epochs: int = 100, lr: float = 1.0) -> list[int]:
        """Train on x (N, in) and labels y in {-1, +1}; returns the mistakes of each epoch."""
        y = numpy.asarray(y)
        if not numpy.isin(y, (-1, 1)).all():
            raise ValueError("Perceptron.fit: labels must be -1 or +1")
        w, b = self.params["weight"][0], self.params["bias"]
        mistakes = []
        for _ in range(epochs):
            errors = 0
            for xi, yi in zip(x, y):
                if yi * (xi @ w + b[0]) <= 0:
                    w += lr * yi * xi
                    b += lr * yi
                    errors += 1
            mistakes.append(errors)
            if errors == 0:
                break
        return mistakes
