"""One training worker: pull weights, compute gradients on its data, push, repeat."""

from __future__ import annotations

import json
import math
import socket
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from optserver_client import Session

from optserver.demo import mlp
from optserver.demo.data import Digits, load_digits, shard

__all__ = ["WorkerPlan", "run_worker", "steps_per_epoch"]

Emit = Callable[[dict[str, Any]], None]
#: Steps between two progress events inside an epoch (for the demo's live table).
PROGRESS_EVERY = 10
#: Pushes of one step refused as stale before a worker gives up. With more workers than the
#: ssp bound on few cores, a worker descheduled between its pull and its push can be refused
#: several times in a row; each retry pulls fresh weights, so this only bounds a livelock.
RETRIES = 100


@dataclass(frozen=True)
class WorkerPlan:
    worker: str
    shard: int | None  # None: random minibatches from the whole training set
    shards: int
    epochs: int = 20
    batch: int = 32
    seed: int = 0
    #: Seconds to keep pushing one step while a server is out (a shard restarting).
    patience: float = 120.0


def steps_per_epoch(examples: int, shards: int, batch: int) -> int:
    """A worker's steps in one epoch: a full pass over the largest of ``shards`` shards of
    ``examples`` (every worker takes as many: a sync round needs one push from each)."""
    return math.ceil(math.ceil(examples / shards) / batch)


def auto_seed() -> int:
    """A seed of this host's own (compose replicas are identical but for their hostnames)."""
    return zlib.crc32(socket.gethostname().encode())


def run_worker(
    session: Session, plan: WorkerPlan, emit: Emit, data: Digits | None = None
) -> dict[str, Any]:
    """Train until ``plan.epochs`` are done; ``emit`` gets a progress event after each epoch.

    Every worker takes the same number of steps per epoch (a sync round needs one push from
    each): a full pass over the largest shard.
    """
    data = data or load_digits()
    if plan.shard is None:
        x, y = data.x_train, data.y_train
    else:
        x, y = shard(data.x_train, data.y_train, plan.shard, plan.shards)
    per_epoch = steps_per_epoch(len(data.y_train), plan.shards, plan.batch)
    rng = np.random.default_rng(plan.seed)
    start = time.perf_counter()
    weights = session.pull()
    steps = 0
    for epoch in range(1, plan.epochs + 1):
        order = rng.permutation(len(y))
        losses: list[float] = []
        staleness: list[int] = []
        for k in range(per_epoch):
            chosen = order[(np.arange(plan.batch) + k * plan.batch) % len(y)]
            compute = _batch_gradients(x[chosen], y[chosen], losses)
            base = session.version
            weights = session.train_step(
                compute, weights, worker=plan.worker, retries=RETRIES, patience=plan.patience
            )
            # Steps by other workers between the weights used and this one's own step.
            staleness.append(max(0, session.version - 1 - base))
            steps += 1
            if steps % PROGRESS_EVERY == 0:
                recent = float(np.mean(losses[-PROGRESS_EVERY:]))
                emit(
                    {
                        "event": "step",
                        "worker": plan.worker,
                        "steps": steps,
                        "loss": recent,
                        "staleness": float(np.mean(staleness)),
                        "version": session.version,
                    }
                )
        emit(
            {
                "event": "epoch",
                "worker": plan.worker,
                "epoch": epoch,
                "epochs": plan.epochs,
                "steps": steps,
                "loss": float(np.mean(losses[-per_epoch:])),
                "accuracy": mlp.accuracy(weights, x, y),
                "version": session.version,
                "staleness": float(np.mean(staleness)),
                "seconds": time.perf_counter() - start,
            }
        )
    result = {
        "event": "done",
        "worker": plan.worker,
        "steps": steps,
        "test_accuracy": mlp.accuracy(weights, data.x_test, data.y_test),
        "version": session.version,
        "seconds": time.perf_counter() - start,
    }
    emit(result)
    return result


def _batch_gradients(
    x: np.ndarray, y: np.ndarray, losses: list[float]
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Gradients of one batch at given weights (recomputed if the server wants fresh ones)."""

    def compute(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        value, grads = mlp.gradients(weights, x, y)
        losses.append(value)
        return grads

    return compute


def printer(style: Literal["text", "json"]) -> Emit:
    """Progress lines on stdout: JSON for the demo's parent process, text for people."""

    def emit(event: dict[str, Any]) -> None:
        if style == "text" and event["event"] == "step":
            return  # people get one line an epoch
        if style == "json":
            line = json.dumps(event)
        elif event["event"] == "epoch":
            line = (
                f"worker {event['worker']} epoch {event['epoch']}/{event['epochs']} "
                f"loss {event['loss']:.4f} train_accuracy {event['accuracy']:.3f} "
                f"version {event['version']} staleness {event['staleness']:.2f}"
            )
        else:
            line = (
                f"worker {event['worker']} done after {event['steps']} steps in "
                f"{event['seconds']:.1f} s; final test_accuracy={event['test_accuracy']:.4f}"
            )
        print(line, file=sys.stdout, flush=True)

    return emit
