"""Writes keras_tiny.safetensors (the weights under Keras names) and
keras_tiny_io.safetensors (an input, NHWC, and Keras' output for it).

    python -m venv /tmp/k && /tmp/k/bin/pip install keras jax safetensors numpy
    KERAS_BACKEND=jax /tmp/k/bin/python tests/data/keras_tiny.py

Odd map sizes with stride 2 make Keras' `same` padding asymmetric; the separable layer
has a depth multiplier of 2; biases are random (Keras starts them at zero).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
import numpy as np
from safetensors.numpy import save_file

here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(7)

x = keras.Input((7, 7, 3))
h = keras.layers.SeparableConv2D(4, 3, strides=2, padding="same", depth_multiplier=2, name="sep")(x)
h = keras.layers.Conv2D(5, (3, 2), strides=(2, 1), padding="same", name="conv")(h)
h = keras.layers.Conv2D(6, 3, dilation_rate=2, padding="same", name="dil")(h)
h = keras.layers.GlobalAveragePooling2D()(h)
y = keras.layers.Dense(3, name="dense")(h)
model = keras.Model(x, y)

weights = {}
for layer in model.layers:
    values = [rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in layer.weights]
    if values:
        layer.set_weights(values)
    for w, v in zip(layer.weights, values):
        weights[f"{layer.name}/{w.name}:0"] = v

inputs = rng.normal(0.0, 1.0, (2, 7, 7, 3)).astype(np.float32)
outputs = np.asarray(model.predict(inputs, verbose=0), dtype=np.float32)
save_file(weights, os.path.join(here, "keras_tiny.safetensors"))
save_file({"input": inputs, "output": outputs}, os.path.join(here, "keras_tiny_io.safetensors"))
for name, v in weights.items():
    print(name, v.shape)
print("output", outputs)
