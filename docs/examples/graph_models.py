"""Graph models: a residual block, a model with two inputs and two outputs, a siamese model with a
shared encoder (docs/layers.md shows this file; the test suite runs it: tests/layers/test_graph_docs.py)."""
import numpy

import gpunet as gn

L = gn.layers
rng = numpy.random.default_rng(0)


def quiet(*args):  # gn.fit's log: this example prints its own lines
    pass


# 1. A residual block is a function from a symbolic value to a symbolic value: y = relu(x + f(x)).
def residual_block(x, width, name):
    h = L.Dense(width, width, name=f"{name}_fc1")(x)
    h = L.Dense(width, width, name=f"{name}_fc2")(L.ReLU()(h))
    return L.ReLU()(L.Add()([x, h]))


x = gn.Input((16,))  # the shape of one sample, without the batch axis
h = residual_block(L.Dense(16, 32, name="stem")(x), 32, "block1")
model = gn.Model(inputs=x, outputs=L.Dense(32, 4, name="head")(h))
print(list(model.params)[:4])  # parameters are keyed by the layers' names

gn.testing.check_layer(model, rng.standard_normal((4, 16)).astype("float32"))  # every gradient, float64 differences
features = rng.standard_normal((512, 16)).astype("float32")
labels = features[:, :4].argmax(axis=1)
history = gn.fit(model, (features, labels), optimizer=gn.optim.Adam(model, lr=1e-2), steps=60, batch_size=64,
                 progress=False, log=quiet)
print(f"residual: train loss {history[0]['train_loss']:.2f} -> {history[-1]['train_loss']:.2f}")

# 2. Two inputs and two outputs: an image and a few numbers in, a class and a score out.
image, numbers = gn.Input((1, 8, 8)), gn.Input((3,))
seen = L.Flatten()(L.MaxPool2D(2)(L.ReLU()(L.Conv2D(1, 4, 3, padding=1, name="conv")(image))))
both = L.Concatenate(axis=1)([seen, numbers])  # (None, 4*4*4 + 3)
hidden = L.ReLU()(L.Dense(67, 16, name="fc")(both))
two = gn.Model(inputs=[image, numbers], outputs=[L.Dense(16, 3, name="cls")(hidden), L.Dense(16, 1, name="score")(hidden)])

images = rng.standard_normal((256, 1, 8, 8)).astype("float32")
extra = rng.standard_normal((256, 3)).astype("float32")
classes = (images.mean(axis=(1, 2, 3)) > 0).astype("int64") + (extra[:, 0] > 0)
scores = extra.sum(axis=1, keepdims=True)
history = gn.fit(two, ([images, extra], [classes, scores]), optimizer=gn.optim.Adam(two, lr=1e-2), steps=40,
                 batch_size=32, loss=["softmax_cross_entropy", "mse"], loss_weights=[1.0, 0.5], progress=False,
                 log=quiet)
print(f"two inputs: train loss {history[0]['train_loss']:.2f} -> {history[-1]['train_loss']:.2f}")

# 3. Siamese: one encoder called on two inputs shares its weights; its gradient is the sum over both calls.
encoder = gn.Sequential(L.Dense(8, 16), L.ReLU(), L.Dense(16, 4), name="encoder")
left, right = gn.Input((8,)), gn.Input((8,))
distance = L.Multiply()([encoder(left), encoder(right)])  # (a product per feature; a Dense sums it)
siamese = gn.Model([left, right], L.Dense(4, 1, name="same")(distance))
print(list(siamese.params))  # the encoder's weights once: "encoder.0.weight", ...
gn.testing.check_layer(siamese, [rng.standard_normal((4, 8)).astype("float32") for _ in range(2)])
print("siamese: every gradient matches float64 finite differences")
