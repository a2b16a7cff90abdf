"""Training-recipe levers applied to each training batch (issue 31): label smoothing and batch mixing.

- ``train.label_smoothing`` e (binary): the target y becomes ``y (1 - e) + e / 2`` (0 -> e/2,
  1 -> 1 - e/2), so the network is not pushed towards infinite logits.
- ``train.mix``: ``mixup`` (Zhang et al. 2018): ``x = lam x + (1 - lam) x[perm]``, the labels mixed
  alike; ``cutmix`` (Yun et al. 2019): a box of ``x[perm]`` pasted into ``x``, the label weight
  ``lam`` recomputed from the box's area after clipping to the image. ``lam ~ Beta(alpha, alpha)``
  with ``alpha = train.mix_alpha``; ``perm`` a permutation of the batch. BCE takes the soft targets.

Applied after augmentation, on the batch tensor, before the step (:meth:`BatchRecipe.__call__`).
The draws come from a generator seeded by ``(seed, epoch, rank)`` (:meth:`BatchRecipe.for_epoch`):
two runs of one seed mix alike, a run resumed at an epoch mixes as the uninterrupted one, and each
data-parallel process mixes its own part of the batch with draws of its own.
Both levers off, the batch passes untouched (and they are not in the run identity:
:meth:`palm.core.params.TrainingConfig.record`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle

#: the stream of the recipe's draws in ``np.random.default_rng([seed, epoch, rank, MIX_STREAM])``
#: (palm.data.dataset's epoch order uses ``[seed, epoch, 1]``: another sequence)
MIX_STREAM = 31


def smooth_targets(y, eps: float):
    """Binary label smoothing: ``y (1 - eps) + eps / 2`` (``y`` itself when ``eps`` is 0)."""
    return y if not eps else y * (1.0 - eps) + eps / 2.0


def mixup(x, y, lam: float, perm: np.ndarray):
    """``(lam x + (1 - lam) x[perm], lam y + (1 - lam) y[perm])``."""
    idx = paddle.to_tensor(np.asarray(perm, dtype=np.int64))
    return (lam * x + (1.0 - lam) * paddle.gather(x, idx), lam * y + (1.0 - lam) * paddle.gather(y, idx))


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: a box of area ``(1 - lam)`` of the image, centred on a
    uniformly drawn pixel and clipped to the image (so its area may be smaller)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - ch // 2, cy + ch // 2], 0, height)
    left, right = np.clip([cx - cw // 2, cx + cw // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


def cutmix(x, y, box: tuple[int, int, int, int], perm: np.ndarray):
    """``x`` with ``box`` (top, bottom, left, right) taken from ``x[perm]``, and the labels mixed
    by the area: ``lam = 1 - box area / image area``. Returns ``(x, y, lam)``."""
    top, bottom, left, right = box
    h, w = x.shape[-2], x.shape[-1]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    idx = paddle.to_tensor(np.asarray(perm, dtype=np.int64))
    out = x.clone()  # only the box is copied from the other images (3x faster than a mask over the batch)
    if bottom > top and right > left:
        out[:, :, top:bottom, left:right] = paddle.gather(x[:, :, top:bottom, left:right], idx)
    return out, lam * y + (1.0 - lam) * paddle.gather(y, idx), lam


@dataclass(frozen=True)
class BatchRecipe:
    """What happens to each training batch: ``mix`` (off, mixup, cutmix) with ``alpha``, then label smoothing."""

    label_smoothing: float = 0.0
    mix: str = "off"
    alpha: float = 0.2
    rng: np.random.Generator | None = None

    @classmethod
    def of(cls, cfg) -> BatchRecipe:
        """The recipe of a :class:`palm.core.params.TrainingConfig` (no generator yet: :meth:`for_epoch`)."""
        return cls(cfg.label_smoothing, cfg.mix, cfg.mix_alpha)

    def for_epoch(self, seed: int, epoch: int, rank: int = 0) -> BatchRecipe:
        """This recipe with the generator of ``(seed, epoch, rank)``."""
        rng = np.random.default_rng([seed, epoch, rank, MIX_STREAM])
        return BatchRecipe(self.label_smoothing, self.mix, self.alpha, rng)

    def __call__(self, x, y):
        """The batch ``(x, y)`` mixed (a draw of lam, a permutation and, for cutmix, a box) and its
        targets smoothed; untouched when the recipe is off."""
        if self.mix != "off":
            if self.rng is None:
                raise RuntimeError("BatchRecipe: no generator (call for_epoch first)")
            lam = float(self.rng.beta(self.alpha, self.alpha))
            perm = self.rng.permutation(x.shape[0])
            if self.mix == "mixup":  # or cutmix: train.mix's schema (palm.core.params) allows no other
                x, y = mixup(x, y, lam, perm)
            else:
                box = cutmix_box(x.shape[-2], x.shape[-1], lam, self.rng)
                x, y, _ = cutmix(x, y, box, perm)
        return x, smooth_targets(y, self.label_smoothing)
