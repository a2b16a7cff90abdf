"""The cost of the training-recipe levers (``train.mix``, ``train.label_smoothing``: :mod:`palm.training.recipe`).

A training step of SE-ResNet18 (randomly initialised, AdamW, BCE on one logit, eager) on a batch
of ``--batch`` random images of ``--size`` px, under each mix mode (label smoothing 0.1 with
mixup and cutmix; smoothing alone is one multiply-add on the labels). The modes take turns within
each of ``--repeat`` rounds of ``--steps`` steps (so a change of load on the machine hits them
alike); the best round of each is kept. Printed: ms per step, its ratio to ``off``, and the ms of
the recipe alone on the batch (the mixing, without the step).

    python benchmarks/recipe.py [--size 96] [--batch 16] [--steps 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import palm  # noqa: F401  (thread settings before paddle loads)

MODES = ("off", "mixup", "cutmix")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="senet18")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    import numpy as np
    import paddle

    from palm.core.runtime import machine_share
    from palm.nn.models import build_model, training_loss
    from palm.training.recipe import BatchRecipe

    paddle.seed(0)
    model = build_model(args.model, image_size=args.size)
    model.train()
    opt = paddle.optimizer.AdamW(1e-3, parameters=model.parameters())
    loss_fn = paddle.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))
    y = paddle.to_tensor(rng.integers(0, 2, (args.batch, 1)).astype(np.float32))
    recipes = {m: BatchRecipe(label_smoothing=0.0 if m == "off" else 0.1, mix=m).for_epoch(0, 0) for m in MODES}

    def step(mode):
        bx, by = recipes[mode](x, y)
        loss = training_loss(model(bx), by, loss_fn)
        loss.backward()
        opt.step()
        opt.clear_grad()

    for mode in MODES:  # warm-up
        step(mode)
    best = {m: float("inf") for m in MODES}
    alone = {m: float("inf") for m in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            best[mode] = min(best[mode], (time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            for _ in range(10):
                recipes[mode](x, y)
            alone[mode] = min(alone[mode], (time.perf_counter() - t0) / 10)
    print(
        f"{args.model}, {machine_share().threads} thread(s), batches of {args.batch} at {args.size} px, "
        f"best of {args.repeat} rounds of {args.steps} steps"
    )
    print("| mix | ms/step | x off | ms of the recipe alone |")
    print("|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {1000 * best[mode]:.0f} | {best[mode] / best['off']:.3f} | {1000 * alone[mode]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
