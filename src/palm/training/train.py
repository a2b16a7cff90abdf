"""The ``train`` stage: trains ``model`` (params.yaml) on the training shards.

- The training split is divided into a stratified *internal holdout* (``train.holdout``,
  :mod:`palm.data.splits`) and the images the network learns from. Model selection
  (``train.select``: ``best`` on the holdout, or ``last``) never looks at the validation set.
- Per epoch it logs train loss and holdout loss/accuracy/AUC with dvclive
  (``metrics/train``) and writes a checkpoint (:mod:`palm.nn.checkpoint`): model, optimizer,
  learning-rate schedule, weight average (:mod:`palm.nn.ema`), epoch, best score and history. A
  run killed mid-training resumes from the last checkpoint when run again with the same
  parameters, data, code and Paddle/numpy (:func:`run_identity`), and trains from scratch,
  saying why, when any of them changed.
- Randomness (data order, augmentation, dropout, batch mixing) is derived from ``(seed, epoch)``,
  so the same seed on the same machine gives the same metrics, resumed or not.
- ``train.label_smoothing`` and ``train.mix`` (:mod:`palm.training.recipe`) change each training
  batch after augmentation: the train loss is then the loss on the mixed, smoothed targets (the
  holdout's is on the true labels).
- ``train.nproc`` > 1 trains data-parallel (:mod:`palm.training.parallel`): every process sees its part
  of each global batch of ``batch_size``, gradients are averaged, only rank 0 writes. Batch-norm
  statistics are each process's own (no SyncBatchNorm).

Output: the trained-model folder ``models/`` (:mod:`palm.nn.artifact`: weights and ``model.json``).

The run is one function per phase: :meth:`Trainer._data` (shards, holdout, loaders),
:meth:`Trainer._networks` (network, optimizer, weight average, loss), :meth:`Trainer._resume`,
then per epoch :meth:`Trainer._train_epoch`, :meth:`Trainer._holdout_epoch` and
:meth:`Trainer._checkpoint`, and :meth:`Trainer._finish` (threshold, ``models/``, summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from dvclive import Live
from tqdm import tqdm

from palm.core.errors import ConfigError, RunError
from palm.core.params import DEFAULT_THRESHOLD, TrainingConfig, training_config
from palm.core.provenance import producer
from palm.core.runtime import check_memory, resolve_device, select_device
from palm.data import shards
from palm.data.dataset import Augment, FundusDataset, Split, load_split, make_loader
from palm.data.splits import stratified_holdout
from palm.evaluation.metrics import choose_threshold, score
from palm.nn import artifact, checkpoint
from palm.nn.ema import WeightEMA
from palm.nn.models import DROPOUT_MODELS, build_model, training_loss, training_memory
from palm.nn.weights import load_state, to_paddle
from palm.training import parallel
from palm.training.recipe import BatchRecipe

# Paddle's notices at the first training step, not problems: batch norm's change of behaviour in
# an old release, and a Tensor.place lookup inside its own static-graph (to_static) code.
warnings.filterwarnings("ignore", message="When training, we now always track global mean", category=UserWarning)
warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface", category=UserWarning)

MODEL_DIR = Path("models")
CHECKPOINT_DIR = Path("checkpoints")
STAGE_ENTRY = Path("stages/train.py")  # where DVC runs the stage (the working directory is the project's)
LIBRARIES = ("paddle", "numpy")  # whose versions are part of a run's identity
LIVE_DIR = Path("metrics/train")
#: training has diverged when an epoch's loss passes this many times the first epoch's (or ln 2,
#: an untrained network's, if that is more), or a weight's magnitude passes MAX_WEIGHT: a run
#: that explodes is stopped before its loss reaches infinity (lr 10 with momentum: 49, 1.6e6, 5e17)
DIVERGED_LOSS_FACTOR = 100.0
#: networks taking larger images are checked against the available memory before they are built
MEMORY_CHECK_ABOVE = 224
MAX_WEIGHT = 1e6


def effective_config(params: dict) -> TrainingConfig:
    """``train:`` of params.yaml overridden by ``models.<model>:`` for the chosen model, validated
    (:func:`palm.core.params.training_config`: params.yaml is the one source of the defaults), and
    checked against the networks and the processes of this run."""
    cfg = training_config(params)
    if isinstance(cfg.threshold, str) and not cfg.holdout > 0:
        raise ConfigError(
            f"train.threshold: the rule {cfg.threshold!r} is chosen on the internal holdout, "
            "so train.holdout must be above 0 (or choose it on out-of-fold predictions with "
            "scripts/cross_validate.py --threshold RULE and set the number it prints)"
        )
    if cfg.dropout is not None and cfg.model not in DROPOUT_MODELS:
        raise ConfigError(f"params.yaml: dropout can be set for {', '.join(DROPOUT_MODELS)} only, not {cfg.model}")
    rank = parallel.current()
    if rank.size > 1 and cfg.nproc != rank.size:  # started by paddle.distributed.launch: its count
        cfg = cfg.model_copy(update={"nproc": rank.size})
    parallel.check_batch(cfg.batch_size, cfg.nproc)
    return cfg


def run_identity(cfg: TrainingConfig, shards_dir: Path) -> dict:
    """What decides a training run's weights, each part by its hash: the effective configuration,
    the exact data it reads (the shards' manifest and every byte of the training shards), the
    source of the code it runs (the stage's entry point ``stages/train.py`` and its import
    closure in ``palm``: the deps ``dvc.yaml`` lists; this module's closure when the library is
    used without the stage) and the versions of Paddle and numpy. A checkpoint is resumed only
    by a run of the same identity."""
    # the threshold rule and the test-time augmentation apply after training: a finished run's
    # checkpoint serves any of them (only model.json is written again)
    config = json.dumps({k: v for k, v in cfg.record().items() if k not in ("threshold", "tta")}, sort_keys=True)
    return {
        "config": hashlib.sha256(config.encode()).hexdigest(),
        "data": shards.digest(shards_dir, "train"),
        **producer(STAGE_ENTRY, __file__, LIBRARIES),
    }


def fingerprint(cfg: TrainingConfig, shards_dir: Path) -> str:
    """A short name of :func:`run_identity`."""
    return hashlib.sha256(json.dumps(run_identity(cfg, shards_dir), sort_keys=True).encode()).hexdigest()[:16]


def holdout_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Loss, accuracy (at the default threshold) and AUC of the holdout, by :func:`palm.evaluation.metrics.score`."""
    m = score(labels, probs, DEFAULT_THRESHOLD, n_boot=0)
    return {"loss": m["loss"], "accuracy": m["accuracy"], "auc": float("nan") if m["auc"] is None else m["auc"]}


@dataclass
class Data:
    """The images a run learns from and the holdout that judges it."""

    train: Split
    hold: Split
    train_ds: FundusDataset
    train_loader: Any  # this process's part of each global batch (a paddle.io.DataLoader)
    hold_loader: Any | None


@dataclass
class Nets:
    """The network being trained, its weight average, and what updates it."""

    # Paddle is read as untyped (pyproject's [tool.mypy]): its layers, optimizers and schedules are Any
    model: Any  # the network (its weights are what is saved)
    trained: Any  # what the steps run: the network, or paddle.DataParallel of it
    ema: WeightEMA | None
    opt: Any
    sched: Any
    loss_fn: Any
    amp_ctx: Callable[[], contextlib.AbstractContextManager]
    scaler: Any  # paddle.amp.GradScaler under fp16, else None

    @property
    def scored(self):
        """The network the holdout judges and that is saved: the weight average, if any."""
        return self.ema.shadow if self.ema is not None else self.model


@dataclass
class Progress:
    """Where the run is: the next epoch, the history of the finished ones, the selected one."""

    start: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    best_file: str | None = None
    meta: dict = field(default_factory=dict)  # the checkpoint's manifest (its files' SHA-256)


class Trainer:
    """One training run of ``params`` (all of params.yaml, or its ``model``, ``image_size``, ``train:``
    and ``models:``); ``self.cfg`` is the typed configuration (:func:`effective_config`)."""

    def __init__(self, params: dict, shards_dir: str | Path = "data/shards"):
        self.cfg = effective_config(params)
        self.rank = parallel.current()
        self.shards_dir = Path(shards_dir)
        self.identity = run_identity(self.cfg, self.shards_dir)

    def run(
        self, model_dir: Path = MODEL_DIR, ckpt_dir: Path = CHECKPOINT_DIR, live_dir: Path = LIVE_DIR
    ) -> dict | None:
        """Train (or resume), save the selected model; returns what ``models/model.json`` says
        (None on the ranks other than 0, which write nothing)."""
        # Fresh parameter and optimizer-state names (conv2d_0.w_0_moment1_0, ...) as in a new
        # process, so that a checkpoint's optimizer state loads whatever ran before in this one.
        with paddle.utils.unique_name.guard():
            if not self.rank.writer:
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    return self._run(Path(model_dir), Path(ckpt_dir), Path(live_dir))
            try:
                return self._run(Path(model_dir), Path(ckpt_dir), Path(live_dir))
            except BaseException:
                # a failed run leaves no metrics that look like a finished run's (its checkpoint,
                # from which it resumes, keeps the history)
                shutil.rmtree(live_dir, ignore_errors=True)
                raise

    def _run(self, model_dir: Path, ckpt_dir: Path, live_dir: Path) -> dict | None:
        """Rank 0 (a lone process included) returns what it saved; the other ranks write nothing."""
        cfg, rank = self.cfg, self.rank
        device = select_device(cfg.device, rank.local_rank, rank.local_size)
        if rank.size > 1:
            parallel.init()
        data = self._data()
        nets = self._networks(data, device)
        progress = self._resume(ckpt_dir, nets)
        live = self._live(live_dir, progress) if rank.writer else None
        print(
            f"training {cfg.model} on {device} (amp {self.amp_mode}"
            + (f", {rank.size} processes of {cfg.batch_size // rank.size} images per batch" if rank.size > 1 else "")
            + f"): {len(data.train)} images, "
            f"{len(data.hold)} held out, {len(data.train_loader)} steps/epoch, "
            f"epochs {progress.start + 1}..{cfg.epochs}"
        )
        t_start = time.perf_counter()
        for epoch in range(progress.start, cfg.epochs):
            rec = self._train_epoch(epoch, data, nets)
            first_loss = progress.history[0]["train_loss"] if progress.history else rec["train_loss"]
            check_divergence(rec["train_loss"], first_loss, nets.model, epoch, cfg)
            if not rank.writer:
                continue
            rec.update(self._holdout_epoch(data, nets))
            progress.history.append(rec)
            self._log(live, rec)
            print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            self._checkpoint(ckpt_dir, epoch, rec, data, nets, progress)
        if not rank.writer:
            return None
        info = self._finish(model_dir, ckpt_dir, data, nets, progress, device)
        # the writer has a logger; every epoch (or the checkpoint resumed from) selected one
        assert live is not None and progress.best is not None
        live.summary = {
            **{k: v for k, v in progress.history[progress.best["epoch"] - 1].items() if k != "epoch"},
            "selected_epoch": progress.best["epoch"],
            "train_seconds": info["train_seconds"],
        }
        live.make_summary()
        live.end()
        print(
            f"saved {model_dir / artifact.MODEL_INFO} and its weights (epoch {progress.best['epoch']}); "
            f"this run trained for {time.perf_counter() - t_start:.1f}s"
        )
        return info

    def _live(self, live_dir: Path, progress: Progress) -> Live:
        """dvclive's logger, with the checkpoint's history replayed so that the curves are whole."""
        shutil.rmtree(live_dir, ignore_errors=True)
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
        for rec in progress.history:
            self._log(live, rec)
        return live

    # -- set-up ----------------------------------------------------------------------
    def _data(self) -> Data:
        """The training shards at the network's input size, divided into learning images and holdout."""
        cfg, seed = self.cfg, self.cfg.seed
        full = load_split(self.shards_dir, "train")
        if full.pixels.shape[1] != cfg.image_size:
            raise ConfigError(f"shards are {full.pixels.shape[1]} px but image_size is {cfg.image_size}")
        full = full.resized(cfg.input_size, cfg.fundus)
        tr_idx, ho_idx = stratified_holdout(full.labels, full.groups, cfg.holdout, seed)
        train, hold = full.subset(tr_idx), full.subset(ho_idx)
        # the schema knows Augment's fields (tests/test_params.py): those not given keep its defaults
        augment = Augment(**cfg.augment.model_dump(exclude_none=True))
        train_ds = FundusDataset(train, augment, seed=seed)
        bs = cfg.batch_size
        if len(train_ds) < self.rank.size:
            raise ConfigError(f"train.nproc: {self.rank.size} processes, but only {len(train_ds)} training images")
        train_loader = make_loader(
            train_ds,
            bs,
            shuffle=True,
            seed=seed,
            workers=cfg.workers,
            drop_last=len(train_ds) > bs,
            rank=self.rank.rank,
            nranks=self.rank.size,
        )
        hold_loader = make_loader(FundusDataset(hold), bs, shuffle=False) if len(hold) else None
        return Data(train, hold, train_ds, train_loader, hold_loader)

    def _amp(self, device: str):
        """``(autocast context, loss scaler or None, mode)`` of ``train.amp`` on ``device``."""
        mode = self.cfg.amp
        if mode == "auto":
            mode = "fp16" if device.startswith("gpu") else "off"
        if mode == "off":
            return contextlib.nullcontext, None, "off"
        ctx = lambda: paddle.amp.auto_cast(level="O1", dtype="float16" if mode == "fp16" else "bfloat16")  # noqa: E731
        scaler = paddle.amp.GradScaler(init_loss_scaling=1024) if mode == "fp16" else None
        return ctx, scaler, mode

    def _networks(self, data: Data, device: str) -> Nets:
        """The network (seeded), its optimizer and schedule, its weight average and the loss."""
        cfg = self.cfg
        amp_ctx, scaler, self.amp_mode = self._amp(device)
        net_kwargs = {} if cfg.dropout is None else {"dropout": cfg.dropout}
        per_rank = -(-cfg.batch_size // self.rank.size)
        assert cfg.input_size is not None  # resolved by training_config: never None
        # before the network is built (LeNet at 4096 px has 2 billion weights); measured on small
        # copies, which takes seconds, so only above the sizes this project trains at
        if cfg.input_size > MEMORY_CHECK_ABOVE:
            check_memory(
                training_memory(cfg.model, cfg.input_size, per_rank, **net_kwargs),
                f"training {cfg.model} at {cfg.input_size} px on batches of {per_rank}",
                "lower image_size (or train.input_size for this model) or train.batch_size",
            )
        paddle.seed(cfg.seed)

        def new_network():  # the trained network and its weight average are built alike
            return build_model(cfg.model, image_size=cfg.input_size, **net_kwargs)

        model = new_network()
        if cfg.to_static:
            if any(isinstance(m, paddle.nn.Dropout) and m.p > 0 for m in model.sublayers()):
                # the static graph draws its dropout masks from its own generator, which
                # paddle.seed does not reset: the same seed would no longer give the same run
                raise ConfigError(
                    f"train.to_static: {cfg.model} has dropout, whose static-graph masks "
                    "are not reproducible from train.seed; use it for networks without dropout"
                )
            model = paddle.jit.to_static(model, full_graph=True)
        # the same initial weights on every rank (paddle.seed above); DataParallel averages the gradients
        trained = paddle.DataParallel(model) if self.rank.size > 1 else model
        opt, sched = self._optimizer(model, len(data.train_loader))
        ema = WeightEMA(model, new_network(), cfg.ema) if cfg.ema else None
        n_pos = int(data.train.labels.sum())
        pos_weight = None
        if cfg.class_balance and n_pos:
            pos_weight = paddle.to_tensor([(len(data.train) - n_pos) / n_pos], dtype="float32")
        return Nets(
            model, trained, ema, opt, sched, paddle.nn.BCEWithLogitsLoss(pos_weight=pos_weight), amp_ctx, scaler
        )

    def _optimizer(self, model, steps_per_epoch: int):
        """AdamW or Nesterov momentum, with a linear warm-up into a cosine or constant rate."""
        cfg = self.cfg
        total = max(1, cfg.epochs * steps_per_epoch)
        warm = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
        if cfg.schedule == "cosine":  # or constant: the typed params (TrainParams) allow no other
            sched = paddle.optimizer.lr.CosineAnnealingDecay(cfg.lr, T_max=max(1, total - warm))
        else:
            sched = paddle.optimizer.lr.LambdaDecay(cfg.lr, lambda _: 1.0)
        if warm > 0:
            sched = paddle.optimizer.lr.LinearWarmup(sched, warm, cfg.lr * 0.01, cfg.lr)
        wd = paddle.regularizer.L2Decay(cfg.weight_decay) if cfg.weight_decay else None
        if cfg.optimizer == "adam":  # or momentum
            opt = paddle.optimizer.AdamW(sched, parameters=model.parameters(), weight_decay=cfg.weight_decay)
        else:
            opt = paddle.optimizer.Momentum(
                sched, momentum=cfg.momentum, parameters=model.parameters(), weight_decay=wd, use_nesterov=True
            )
        return opt, sched

    def _resume(self, ckpt_dir: Path, nets: Nets) -> Progress:
        """The progress of this run's checkpoint, loaded into ``nets``; a fresh start without one.
        Every rank loads the same checkpoint (on several machines, ``checkpoints/`` is shared)."""
        progress = self._load_checkpoint(ckpt_dir, nets)
        if self.rank.size > 1:
            parallel.same_everywhere(progress.start, "the epoch to resume from")
        return progress

    def _load_checkpoint(self, ckpt_dir: Path, nets: Nets) -> Progress:
        resumed = checkpoint.load(ckpt_dir, self.identity, tidy=self.rank.writer)
        if resumed is None:
            if self.rank.writer:  # another run's checkpoint (or a broken one) is never resumed
                checkpoint.discard(ckpt_dir)
            return Progress()
        meta, state = resumed
        nets.model.set_state_dict(state["model"])
        with warnings.catch_warnings():
            # LinearWarmup keeps its inner schedule's state under a key of its own, which it
            # restores itself; Paddle's base class still warns that the key is "unused"
            warnings.filterwarnings("ignore", message="There are some unused values in state_dict")
            nets.opt.set_state_dict(state["opt"])
            nets.sched.set_state_dict(state["sched"])
        if nets.ema is not None:
            nets.ema.set_state_dict(state["ema"])
        print(f"resuming from the checkpoint of epoch {meta['epoch']} of {self.cfg.epochs}")
        return Progress(meta["epoch"], meta["history"], meta.get("best"), meta.get("best_file"), meta)

    # -- one epoch -----------------------------------------------------------------------
    def _train_epoch(self, epoch: int, data: Data, nets: Nets) -> dict:
        """One pass over the learning images; returns the epoch's record (train loss, rate, seconds)."""
        cfg = self.cfg
        # dropout etc.: a function of (seed, epoch), and of the rank, whose images are others
        paddle.seed(cfg.seed * 100003 + epoch + 7919 * self.rank.rank)
        data.train_ds.set_epoch(epoch)
        # label smoothing and batch mixing (train.label_smoothing, train.mix): draws of (seed, epoch, rank)
        recipe = BatchRecipe.of(cfg).for_epoch(cfg.seed, epoch, self.rank.rank)
        nets.model.train()
        n: float  # a count, summed over the ranks as a float
        t0, total, n = time.perf_counter(), 0.0, 0
        bar = tqdm(
            data.train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            dynamic_ncols=True,
            disable=not self.rank.writer,
        )
        for x, y in bar:
            lv = self._step(nets, *recipe(x, y))
            if not math.isfinite(lv):
                raise RunError(f"training diverged: loss is {lv} at epoch {epoch + 1} (lower train.lr for {cfg.model})")
            total += lv * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / n:.4f}")
        if self.rank.size > 1:  # the mean over every global batch, as one process logs it
            total, n = parallel.all_reduce_sum([total, n])
        return {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "lr": float(nets.sched.get_lr()),
            "epoch_seconds": time.perf_counter() - t0,
        }

    @staticmethod
    def _step(nets: Nets, x, y) -> float:
        """One optimizer step on the batch ``(x, y)`` (loss scaled under fp16); returns its loss."""
        with nets.amp_ctx():
            loss = training_loss(nets.trained(x), y, nets.loss_fn)
        if nets.scaler is not None:
            nets.scaler.scale(loss).backward()
            nets.scaler.step(nets.opt)
            nets.scaler.update()
        else:
            loss.backward()
            nets.opt.step()
        nets.opt.clear_grad()
        nets.sched.step()
        if nets.ema is not None:
            nets.ema.update()
        return float(loss)

    @staticmethod
    def _holdout_epoch(data: Data, nets: Nets) -> dict:
        """The holdout's loss, accuracy and AUC by the network that would be saved (none without a holdout)."""
        if data.hold_loader is None:
            return {}
        hm = holdout_metrics(data.hold.labels, artifact.predict_probs(nets.scored, data.hold_loader, nets.amp_ctx))
        return {f"holdout_{k}": v for k, v in hm.items()}

    def _checkpoint(self, ckpt_dir: Path, epoch: int, rec: dict, data: Data, nets: Nets, progress: Progress) -> None:
        """Select (``train.select``) and write this epoch's checkpoint."""
        best, best_state = progress.best, None
        score_ = self._selection_score(rec)
        if self.cfg.select == "last" or data.hold_loader is None or best is None or score_ > tuple(best["score"]):
            progress.best = {"epoch": epoch + 1, "score": list(score_)}
            best_state = nets.scored.state_dict()
        state = {"model": nets.model.state_dict(), "opt": nets.opt.state_dict(), "sched": nets.sched.state_dict()}
        if nets.ema is not None:
            state["ema"] = nets.ema.state_dict()
        meta = {
            "identity": self.identity,
            "epoch": epoch + 1,
            "history": progress.history,
            "best": progress.best,
            "config": self.cfg.record(),
        }
        progress.meta = checkpoint.save(ckpt_dir, state, meta, best_state)
        progress.best_file = progress.meta["best_file"]

    def _selection_score(self, rec: dict) -> tuple:
        """Larger is better: the holdout's accuracy, loss or AUC as ``train.select_by`` says."""
        loss = -rec.get("holdout_loss", 0.0)
        auc = rec.get("holdout_auc", 0.0)
        return {
            "loss": (loss,),
            "accuracy": (rec.get("holdout_accuracy", 0.0), loss),
            "auc": (auc if math.isfinite(auc) else 0.0, loss),
        }[self.cfg.select_by]

    # -- the end ---------------------------------------------------------------------------
    def _finish(self, model_dir: Path, ckpt_dir: Path, data: Data, nets: Nets, progress: Progress, device: str) -> dict:
        """Save the selected network with its threshold as ``models/``; returns its ``model.json``."""
        cfg, best = self.cfg, progress.best
        if best is None or not progress.best_file:
            raise ConfigError(f"train.epochs is {cfg.epochs}: no epoch trained, no model to save")
        weights = ckpt_dir / progress.best_file
        damage = checkpoint.damaged(ckpt_dir, progress.meta, keys=("best_file",))
        if damage:  # never promoted; the next run's checkpoint.load finds the same damage and starts afresh
            raise RunError(f"checkpoint damaged ({damage}): no model saved; run the stage again to train afresh")
        threshold = self._threshold(nets, data, weights)
        info = {
            "model": cfg.model,
            "image_size": cfg.image_size,
            "input_size": cfg.input_size,
            "threshold": threshold,
            "threshold_rule": str(cfg.threshold),
            "tta": cfg.tta,
            "selected_epoch": best["epoch"],
            "epochs": cfg.epochs,
            "device": device,
            "amp": self.amp_mode,
            "train_seconds": round(sum(r["epoch_seconds"] for r in progress.history), 2),
            "n_train": len(data.train),
            "n_holdout": len(data.hold),
            "config": cfg.record(),
        }
        if "fundus" in info["config"]:  # how a photograph is enhanced before the network (model.json)
            info["fundus"] = info["config"]["fundus"]
        artifact.save(model_dir, weights, info)
        return info

    def _threshold(self, nets: Nets, data: Data, weights: Path) -> float:
        """``train.threshold`` as a number: itself, or its rule applied to the holdout's
        predictions by the saved network (never the validation set)."""
        rule = self.cfg.threshold
        if isinstance(rule, float):
            return rule
        nets.scored.set_state_dict(to_paddle(load_state(weights)))
        t = choose_threshold(
            data.hold.labels, artifact.predict_probs(nets.scored, data.hold_loader, nets.amp_ctx), rule
        )
        print(f"threshold {t:.4f}: {rule} on the {len(data.hold)}-image holdout")
        return t

    @staticmethod
    def _log(live, rec: dict) -> None:
        for key, value in rec.items():
            if key != "epoch" and value is not None and math.isfinite(value):
                live.log_metric(key, value)
        live.next_step()


def check_divergence(loss: float, first_loss: float, model, epoch: int, cfg: TrainingConfig) -> None:
    """A :class:`RunError` when the epoch's mean ``loss`` is far above the first epoch's, or a
    weight of ``model`` is not finite or huge (:data:`DIVERGED_LOSS_FACTOR`, :data:`MAX_WEIGHT`);
    the same on every rank (the loss is the global mean, the weights are the same)."""
    hint = f"lower train.lr (now {cfg.lr:g}) for {cfg.model}" + (
        " or train.momentum" if cfg.optimizer == "momentum" else ""
    )
    limit = DIVERGED_LOSS_FACTOR * max(first_loss, math.log(2))
    if not math.isfinite(loss) or loss > limit:
        raise RunError(
            f"training diverged: loss {loss:.4g} at epoch {epoch + 1}, above {limit:.4g} "
            f"({DIVERGED_LOSS_FACTOR:g}x the first epoch's {first_loss:.4g}); no model saved; {hint}"
        )
    for name, p in model.named_parameters():
        peak = float(paddle.max(paddle.abs(p.detach())))
        if not peak <= MAX_WEIGHT:  # NaN too
            raise RunError(
                f"training diverged: weight {name} reached {peak:.4g} at epoch {epoch + 1} "
                f"(limit {MAX_WEIGHT:g}); no model saved; {hint}"
            )


def train_rank(params: dict) -> dict | None:
    """One training process: the whole run, or one rank of a distributed one."""
    return Trainer(params).run()


def main(params: dict) -> None:
    """The train stage: one process, or ``train.nproc`` ranks spawned on this machine, or (under
    ``paddle.distributed.launch``) this process as one rank of the launcher's job."""
    cfg = effective_config(params)
    nproc = cfg.nproc
    if nproc > 1 and not parallel.launched():
        device = resolve_device(cfg.device, 0, nproc)  # a bad device is one error here, not one per process
        print(f"train.nproc = {nproc}: starting {nproc} training processes on {device.split(':')[0]}")
        parallel.spawn(train_rank, (params,), nproc, gpu=device.startswith("gpu"))
    else:
        train_rank(params)
