"""A two-layer perceptron in numpy: 64 inputs, a tanh hidden layer, 10 softmax outputs."""

from __future__ import annotations

import numpy as np

__all__ = ["HIDDEN", "accuracy", "gradients", "init_params", "loss"]

HIDDEN = 64
Params = dict[str, np.ndarray]


def init_params(seed: int = 0, inputs: int = 64, hidden: int = HIDDEN, classes: int = 10) -> Params:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(classes, np.float32),
    }


def _forward(params: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def loss(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    _, probs = _forward(params, x)
    return float(-np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))


def gradients(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean cross-entropy of the batch and its gradient with respect to every parameter."""
    hidden, probs = _forward(params, x)
    n = len(y)
    value = float(-np.mean(np.log(probs[np.arange(n), y] + 1e-12)))
    d_logits = probs
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    d_hidden = (d_logits @ params["w2"].T) * (1.0 - hidden * hidden)
    grads = {
        "w1": x.T @ d_hidden,
        "b1": d_hidden.sum(axis=0),
        "w2": hidden.T @ d_logits,
        "b2": d_logits.sum(axis=0),
    }
    return value, {k: v.astype(np.float32, copy=False) for k, v in grads.items()}


def accuracy(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    _, probs = _forward(params, x)
    return float(np.mean(probs.argmax(axis=1) == y))
