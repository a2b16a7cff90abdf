"""Reading the preprocessed shards: a ``paddle.io.Dataset`` with optional augmentation.

A :class:`Split` holds a split's labels and names; its pixels stay on disk and are read one
image at a time (:class:`palm.data.shards.ShardImages`), so memory does not grow with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from palm.core.runtime import exact_cos_sin, fixed_opencv
from palm.data.fundus import Fundus
from palm.data.image import to_chw_float
from palm.data.shards import ShardImages, open_split

cv2 = fixed_opencv()   # OpenCV's baseline code on every CPU: the same pixels everywhere


@dataclass
class Split:
    """One split of the shards: ``pixels[i]`` is image ``i`` (uint8 HWC RGB, read from disk when asked)."""

    pixels: ShardImages
    labels: np.ndarray
    images: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.pixels.subset(idx), self.labels[idx],
                     [self.images[i] for i in idx], [self.groups[i] for i in idx])

    def resized(self, size: int | None, fundus=None) -> "Split":
        """The same images as a model sees them: enhanced by ``fundus`` (its ``train.fundus``,
        :mod:`palm.data.fundus`; None: not) and resized to ``size`` x ``size`` (its ``input_size``),
        as each is read (:func:`palm.data.image.to_input`)."""
        if not Fundus.of(fundus) and (size is None or self.pixels.shape[1:3] == (size, size)):
            return self
        return Split(self.pixels.resized(size or self.pixels.side, fundus), self.labels, self.images, self.groups)


def load_split(shards_dir: str | Path, split: str, size: int | None = None, fundus=None) -> Split:
    """One split of the shards, enhanced and resized when asked (see ``Split.resized``)."""
    return Split(*open_split(shards_dir, split)).resized(size, fundus)


@dataclass
class Augment:
    """Random photometric and geometric changes to a uint8 RGB image (all off by default)."""

    hflip: bool = False
    vflip: bool = False
    rotate_deg: float = 0.0
    brightness: float = 0.0   # max relative change, e.g. 0.2 = +-20%
    contrast: float = 0.0
    scale: float = 0.0        # max relative zoom, e.g. 0.1 = 0.9x..1.1x

    @property
    def active(self) -> bool:
        return bool(self.hflip or self.vflip or self.rotate_deg or self.brightness or self.contrast or self.scale)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            img = img[::-1]
        if self.rotate_deg or self.scale:
            h, w = img.shape[:2]
            angle = rng.uniform(-self.rotate_deg, self.rotate_deg)
            zoom = 1.0 + rng.uniform(-self.scale, self.scale)
            m = _rotation(w / 2, h / 2, angle, zoom)
            img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if self.brightness or self.contrast:
            x = img.astype(np.float32)
            b = 1.0 + rng.uniform(-self.brightness, self.brightness)
            c = 1.0 + rng.uniform(-self.contrast, self.contrast)
            mean = x.mean()
            img = np.clip((x - mean) * c + mean * b, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)


def _rotation(cx: float, cy: float, degrees: float, zoom: float) -> np.ndarray:
    """cv2.getRotationMatrix2D, with a cosine and sine that are the same bits on every CPU (OpenCV's
    come from the C library, whose FMA variants round differently)."""
    cos, sin = exact_cos_sin(degrees * (np.pi / 180))
    a, b = float(cos) * zoom, float(sin) * zoom
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


class FundusDataset(paddle.io.Dataset):
    """Items: (float32 CHW image in [-1, 1], float32 label of shape (1,)).

    Augmentation is deterministic given ``seed``, the epoch (``set_epoch``) and the item
    index, whatever the number of loader workers.
    """

    def __init__(self, split: Split, augment: Augment | None = None, seed: int = 0):
        super().__init__()
        self.split = split
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        img = self.split.pixels[i]
        if self.augment is not None:
            img = self.augment(img, np.random.default_rng([self.seed, self.epoch, int(i)]))
        return to_chw_float(img), np.array([self.split.labels[i]], dtype=np.float32)


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The order of the ``n`` training images in ``epoch``: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 1]).permutation(n).tolist()


class EpochShuffleSampler(paddle.io.Sampler):
    """A different, reproducible order each epoch (:func:`epoch_order`)."""

    def __init__(self, dataset: FundusDataset, seed: int):
        super().__init__(dataset)
        self.dataset, self.seed = dataset, seed

    def __iter__(self):
        return iter(epoch_order(self.seed, self.dataset.epoch, len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


class RankBatchSampler(paddle.io.DistributedBatchSampler):
    """Rank ``rank``'s part of every global batch of ``batch_size`` images: the global batches
    are those one process makes of :func:`epoch_order` (``drop_last`` alike), and each is cut
    into ``nranks`` consecutive equal parts (a global batch smaller than ``batch_size``, the
    only one of a training set no larger than it, as evenly as it goes). So N processes see
    exactly the batches one process sees, the augmentation of each image included."""

    def __init__(self, dataset: FundusDataset, batch_size: int, seed: int, rank: int, nranks: int,
                 drop_last: bool):
        super().__init__(dataset, batch_size // nranks, num_replicas=nranks, rank=rank, shuffle=True,
                         drop_last=drop_last)
        self.global_batch, self.seed = batch_size, seed

    def __iter__(self):
        order = epoch_order(self.seed, self.dataset.epoch, len(self.dataset))
        for start in range(0, len(order), self.global_batch):
            batch = order[start:start + self.global_batch]
            if len(batch) < self.global_batch and self.drop_last:
                return
            yield np.array_split(np.asarray(batch), self.nranks)[self.local_rank].tolist()

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)


def make_loader(dataset: FundusDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                workers: int = 0, drop_last: bool = False, rank: int = 0, nranks: int = 1) -> paddle.io.DataLoader:
    """Batches of ``dataset`` (shuffled per epoch, or in order); with ``nranks`` > 1, rank
    ``rank``'s parts of the global batches of ``batch_size`` (:class:`RankBatchSampler`)."""
    if shuffle and nranks > 1:
        batch_sampler = RankBatchSampler(dataset, batch_size, seed, rank, nranks, drop_last)
    else:
        sampler = EpochShuffleSampler(dataset, seed) if shuffle else paddle.io.SequenceSampler(dataset)
        batch_sampler = paddle.io.BatchSampler(sampler=sampler, batch_size=batch_size, drop_last=drop_last)
    if workers > 0:  # worker processes: Paddle sends their errors to the main process itself
        return paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, use_shared_memory=True)
    return ReportingLoader(_Reporting(dataset), batch_sampler=batch_sampler, num_workers=0, use_shared_memory=False)


class _Reporting(paddle.io.Dataset):
    """``dataset`` whose errors are kept for the main thread (:class:`ReportingLoader`)."""

    def __init__(self, dataset):
        self.inner, self.failure, self.on_failure = dataset, None, None

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        try:
            return self.inner[i]
        except Exception as exc:
            self.failure = exc
            if self.on_failure is not None:
                self.on_failure()
            # the end of the reading thread's loop without a traceback; the main thread raises exc
            raise StopIteration from None


class ReportingLoader(paddle.io.DataLoader):
    """Paddle's loader without worker processes reads in a thread; an error there (a truncated
    shard, an unreadable file) used to end that thread while the main one waited for its next
    batch for ever, deaf to Ctrl-C and SIGTERM. Here the error ends the reading at once and is
    raised in the main thread, as it would be without a thread."""

    def __iter__(self):
        reporting: _Reporting = self.dataset
        reporting.failure = None
        it = super().__iter__()
        # what Paddle's own thread does when packing a batch fails: stop, and wake the reader
        reporting.on_failure = stop = getattr(it, "_exit_thread_unexpectedly", None)
        if reporting.failure is not None and stop is not None:  # failed before the line above
            stop()
        try:
            for batch in it:
                if reporting.failure is not None:
                    break
                yield batch
        except Exception:
            if reporting.failure is None:
                raise
        finally:
            reporting.on_failure = None
        if reporting.failure is not None:
            raise reporting.failure
