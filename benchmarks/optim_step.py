"""Time one optimizer step of optserver's core next to torch.optim's CPU paths.

    python benchmarks/optim_step.py [--sizes 1e6 1e7] [--repeat 15] [--threads N]

For each optimizer and size (float32, one tensor), the median wall time of one step of
``optserver.optim`` and of torch.optim's single-tensor (``foreach=False``), multi-tensor
(``foreach=True``) and fused (``fused=True``, where torch has it on CPU) implementations, in the
same process on the same data, and the ratio of ours to torch's fastest path.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from configs import CONFIGS
from timing import median_ms

from optserver.optim import configure_threads, create

TORCH_NAMES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
               "adamw": "AdamW"}  # fmt: skip


def bench_ours(config: dict[str, Any], p: np.ndarray, g: np.ndarray, repeat: int) -> float:
    opt = create(config)
    params = {"w": p.copy()}
    state = opt.init(params)
    grads = {"w": g}
    return median_ms(lambda: opt.update(grads, state, params), repeat)


def bench_torch(
    config: dict[str, Any], p: np.ndarray, g: np.ndarray, repeat: int, **impl: bool
) -> float | None:
    import torch

    options = {k: v for k, v in config.items() if k != "name"}
    tensor = torch.from_numpy(p.copy()).requires_grad_(True)
    tensor.grad = torch.from_numpy(g)
    try:
        opt = getattr(torch.optim, TORCH_NAMES[config["name"]])([tensor], **options, **impl)
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return None  # this implementation does not exist on CPU for this optimizer
    return median_ms(opt.step, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (ours)")
    args = parser.parse_args()
    if args.threads:
        configure_threads(args.threads)

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; float32; "
          f"median of {args.repeat} steps, milliseconds")  # fmt: skip
    header = f"{'optimizer':<9} {'params':>6} {'ours':>8} {'single':>8} {'foreach':>8} " \
             f"{'fused':>8}  {'ours/fastest':>12}"  # fmt: skip
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.sizes):
        p = rng.standard_normal(size, dtype=np.float32)
        g = rng.standard_normal(size, dtype=np.float32)
        for config in CONFIGS:
            ours = bench_ours(config, p, g, args.repeat)
            single = bench_torch(config, p, g, args.repeat, foreach=False)
            foreach = bench_torch(config, p, g, args.repeat, foreach=True)
            fused = bench_torch(config, p, g, args.repeat, fused=True)
            fastest = min(t for t in (single, foreach, fused) if t is not None)

            def cell(t: float | None) -> str:
                return f"{t:8.2f}" if t is not None else f"{'n/a':>8}"

            print(f"{config['name']:<9} {size:>6.0e} {cell(ours)} {cell(single)} {cell(foreach)} "
                  f"{cell(fused)}  {ours / fastest:11.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
