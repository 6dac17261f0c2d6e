"""scikit-learn's digits (shipped inside the package: nothing is downloaded), split and sharded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Digits", "load_digits", "shard"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # (n, 64) float32 in [0, 1]
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> Digits:
    """The 1,797 8x8 digits, scaled to [0, 1], split 80/20 (stratified, fixed seed)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise SystemExit(
            "the demo needs scikit-learn for its dataset: pip install 'optserver[demo]'"
        ) from exc
    data = sklearn_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return Digits(x_train, y_train, x_test, y_test)


def shard(x: np.ndarray, y: np.ndarray, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``index``-th of ``count`` interleaved shards (every count-th example)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} does not exist among {count}")
    return x[index::count], y[index::count]
