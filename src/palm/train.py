"""The ``train`` stage: trains ``model`` (params.yaml) on the training shards.

- The training split is divided into a stratified *internal holdout* (``train.holdout``)
  and the images the network learns from. Model selection (``train.select``: ``best`` on
  the holdout, or ``last``) never looks at the validation set.
- Per epoch it logs train loss and holdout loss/accuracy/AUC with dvclive
  (``metrics/train``) and writes a checkpoint to ``checkpoints/`` (git-ignored, not a DVC output):
  model, optimizer, learning-rate schedule, epoch, best score and history. A run killed
  mid-training resumes from the last checkpoint when run again with the same parameters
  and data, and starts afresh when they changed.
- Randomness (data order, augmentation, dropout) is derived from ``(seed, epoch)``, so the
  same seed on the same machine gives the same metrics, resumed or not.

Outputs: ``models/model.safetensors`` (weights, :mod:`palm.weights`) and ``models/model.json`` (what is needed to
rebuild and apply it: model name, image size of the shards, the network's input size,
threshold).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from palm.errors import ConfigError, RunError
from palm.fsutil import atomic_dir
from palm.weights import MODEL_WEIGHTS

# Paddle's notices at the first training step, not problems: batch norm's change of behaviour in
# an old release, and a Tensor.place lookup inside its own static-graph (to_static) code.
warnings.filterwarnings("ignore", message="When training, we now always track global mean", category=UserWarning)
warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface", category=UserWarning)

MODEL_DIR = Path("models")
CHECKPOINT_DIR = Path("checkpoints")
LIVE_DIR = Path("metrics/train")


def effective_config(params: dict) -> dict:
    """``train:`` of params.yaml overridden by ``models.<model>:`` for the chosen model, validated
    (:func:`palm.params.training_config`: params.yaml is the one source of the defaults)."""
    from palm.params import training_config

    cfg = training_config(params)
    name = cfg["model"]
    # input_size caps the side the network sees: smaller shards (image_size) are used as they are
    cfg["input_size"] = min(int(cfg["input_size"] or cfg["image_size"]), cfg["image_size"])
    from palm.metrics import parse_threshold

    cfg["threshold"] = parse_threshold(cfg["threshold"])
    if isinstance(cfg["threshold"], str) and not float(cfg["holdout"]) > 0:
        raise ConfigError(f"train.threshold: the rule {cfg['threshold']!r} is chosen on the internal holdout, "
                          "so train.holdout must be above 0 (or choose it on out-of-fold predictions with "
                          "scripts/cross_validate.py --threshold RULE and set the number it prints)")
    if cfg["dropout"] is not None:
        from palm.models import DROPOUT_MODELS
        if name not in DROPOUT_MODELS:
            raise ConfigError(f"params.yaml: dropout can be set for {', '.join(DROPOUT_MODELS)} only, not {name}")
    return cfg


def fingerprint(cfg: dict, shards_dir: Path) -> str:
    """Identifies a training run: its configuration and the exact data it reads."""
    # the threshold rule is applied after training: a finished run's checkpoint serves any rule
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k != "threshold"}, sort_keys=True).encode())
    h.update((shards_dir / "manifest.json").read_bytes())
    return h.hexdigest()[:16]


def holdout_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Loss, accuracy (at 0.5) and AUC of the holdout, by :func:`palm.metrics.score` (no intervals)."""
    from palm.metrics import score

    m = score(labels, probs, 0.5, n_boot=0)
    return {"loss": m["loss"], "accuracy": m["accuracy"], "auc": float("nan") if m["auc"] is None else m["auc"]}


def predict_probs(model, loader, amp_ctx) -> np.ndarray:
    import paddle
    import paddle.nn.functional as F

    from palm.models import main_logits

    model.eval()
    out = []
    with paddle.no_grad():
        for x, _ in loader:
            with amp_ctx():
                logits = main_logits(model(x))
            out.append(F.sigmoid(logits.astype("float32")).numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


class WeightEMA:
    """Exponential moving average of a network's weights and batch-norm statistics.

    ``decay`` applies per optimizer step, ramped up as ``min(decay, (1 + t) / (10 + t))`` so
    that the first steps do not keep the random initial weights. The averaged network is a
    second, eager copy of the architecture (``shadow``), used for the holdout and saved.
    """

    def __init__(self, model, shadow, decay: float):
        self.shadow, self.decay, self.steps = shadow, float(decay), 0
        self.shadow.set_state_dict(model.state_dict())
        self.shadow.eval()
        # (average, current) tensor pairs, looked up once: update() runs after every step
        current = model.state_dict()
        self.pairs = [(avg, current[name]) for name, avg in shadow.state_dict().items()]

    def update(self) -> None:
        import paddle

        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with paddle.no_grad():
            for avg, cur in self.pairs:
                if paddle.is_floating_point(avg):
                    avg.set_value(avg * d + cur * (1 - d))
                else:
                    avg.set_value(cur)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.shadow.state_dict()}

    def set_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.shadow.set_state_dict(state["weights"])


class Trainer:
    def __init__(self, params: dict, shards_dir: str | Path = "data/shards"):
        self.cfg = effective_config(params)
        self.shards_dir = Path(shards_dir)
        self.fp = fingerprint(self.cfg, self.shards_dir)

    # -- set-up ----------------------------------------------------------------------
    def _amp(self, device: str):
        import contextlib

        import paddle

        mode = self.cfg["amp"]
        if mode == "auto":
            mode = "fp16" if device.startswith("gpu") else "off"
        if mode == "off":
            return contextlib.nullcontext, None, "off"
        if mode not in ("fp16", "bf16"):
            raise ConfigError(f"train.amp must be auto, off, fp16 or bf16, got {mode!r}")
        ctx = lambda: paddle.amp.auto_cast(level="O1", dtype="float16" if mode == "fp16" else "bfloat16")  # noqa: E731
        scaler = paddle.amp.GradScaler(init_loss_scaling=1024) if mode == "fp16" else None
        return ctx, scaler, mode

    def _optimizer(self, model, steps_per_epoch: int):
        import paddle

        cfg = self.cfg
        total = max(1, cfg["epochs"] * steps_per_epoch)
        warm = min(total - 1, int(cfg["warmup_epochs"] * steps_per_epoch))
        if cfg["schedule"] == "cosine":
            sched = paddle.optimizer.lr.CosineAnnealingDecay(cfg["lr"], T_max=max(1, total - warm))
        elif cfg["schedule"] == "constant":
            sched = paddle.optimizer.lr.LambdaDecay(cfg["lr"], lambda _: 1.0)
        else:
            raise ConfigError(f"train.schedule must be cosine or constant, got {cfg['schedule']!r}")
        if warm > 0:
            sched = paddle.optimizer.lr.LinearWarmup(sched, warm, cfg["lr"] * 0.01, cfg["lr"])
        wd = paddle.regularizer.L2Decay(cfg["weight_decay"]) if cfg["weight_decay"] else None
        if cfg["optimizer"] == "adam":
            opt = paddle.optimizer.AdamW(sched, parameters=model.parameters(), weight_decay=cfg["weight_decay"])
        elif cfg["optimizer"] == "momentum":
            opt = paddle.optimizer.Momentum(sched, momentum=cfg["momentum"], parameters=model.parameters(),
                                            weight_decay=wd, use_nesterov=True)
        else:
            raise ConfigError(f"train.optimizer must be adam or momentum, got {cfg['optimizer']!r}")
        return opt, sched

    # -- checkpoints -----------------------------------------------------------------
    # checkpoints/checkpoint.json is the manifest, written last (atomically): it names the
    # weights files of its epoch (state-NNNN.safetensors: network, optimizer, schedule, weight
    # average; best-NNNN.safetensors: the selected network), which are complete before it is
    # written. A kill at any instant leaves the previous manifest with its files, or the new
    # one with its files; files that no manifest names are removed at the next save or resume.
    def _load_checkpoint(self, ckpt_dir: Path):
        from palm.weights import load_state

        meta_path = ckpt_dir / "checkpoint.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            print(f"{meta_path} is unreadable: starting afresh")
            return None
        if meta.get("fingerprint") != self.fp or "state_file" not in meta:
            print("checkpoint is from other parameters or data: starting afresh")
            return None
        _remove_unlisted(ckpt_dir, meta)
        return meta, load_state(ckpt_dir / meta["state_file"])

    def _save_checkpoint(self, ckpt_dir: Path, model, opt, sched, meta: dict, ema=None, best_state=None):
        from palm.fsutil import atomic_file
        from palm.weights import save_state

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        old = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            old = json.loads((ckpt_dir / "checkpoint.json").read_text())
        epoch = int(meta["epoch"])
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        meta = {**meta, "state_file": f"state-{epoch:04d}.safetensors"}
        save_state(state, ckpt_dir / meta["state_file"])
        if best_state is not None:
            meta["best_file"] = f"best-{epoch:04d}.safetensors"
            save_state(best_state, ckpt_dir / meta["best_file"])
        else:
            meta["best_file"] = old.get("best_file")
        with atomic_file(ckpt_dir / "checkpoint.json") as f:
            f.write(json.dumps(meta, indent=1))
        _remove_unlisted(ckpt_dir, meta)
        return meta

    # -- the loop ----------------------------------------------------------------------
    def run(self, model_dir: Path = MODEL_DIR, ckpt_dir: Path = CHECKPOINT_DIR, live_dir: Path = LIVE_DIR) -> dict:
        """Train (or resume), save the selected model; returns what ``models/model.json`` says."""
        import paddle

        # Fresh parameter and optimizer-state names (conv2d_0.w_0_moment1_0, ...) as in a new
        # process, so that a checkpoint's optimizer state loads whatever ran before in this one.
        with paddle.utils.unique_name.guard():
            return self._run(model_dir, ckpt_dir, live_dir)

    def _run(self, model_dir: Path, ckpt_dir: Path, live_dir: Path) -> dict:
        import paddle
        from dvclive import Live
        from tqdm import tqdm

        from palm.dataset import Augment, FundusDataset, load_split, make_loader, stratified_holdout
        from palm.models import build_model, training_loss
        from palm.runtime import select_device

        cfg = self.cfg
        device = select_device(cfg["device"])
        amp_ctx, scaler, amp_mode = self._amp(device)
        seed = int(cfg["seed"])

        full = load_split(self.shards_dir, "train")
        if full.pixels.shape[1] != cfg["image_size"]:
            raise ConfigError(f"shards are {full.pixels.shape[1]} px but image_size is {cfg['image_size']}")
        full = full.resized(cfg["input_size"])
        tr_idx, ho_idx = stratified_holdout(full, float(cfg["holdout"]), seed)
        train_split, hold_split = full.subset(tr_idx), full.subset(ho_idx)
        try:
            augment = Augment(**cfg["augment"])
        except TypeError:
            raise ConfigError(f"train.augment: unknown key in {cfg['augment']} (known: "
                            f"{', '.join(Augment.__dataclass_fields__)})") from None
        train_ds = FundusDataset(train_split, augment, seed=seed)
        bs = int(cfg["batch_size"])
        train_loader = make_loader(train_ds, bs, shuffle=True, seed=seed, workers=int(cfg["workers"]),
                                   drop_last=len(train_ds) > bs)
        hold_loader = make_loader(FundusDataset(hold_split), bs, shuffle=False) if len(hold_split) else None
        steps_per_epoch = len(train_loader)

        paddle.seed(seed)
        net_kwargs = {} if cfg["dropout"] is None else {"dropout": float(cfg["dropout"])}

        def new_network():  # the trained network and its weight average are built alike
            return build_model(cfg["model"], image_size=cfg["input_size"], **net_kwargs)

        model = new_network()
        if cfg["to_static"]:
            if any(isinstance(m, paddle.nn.Dropout) and m.p > 0 for m in model.sublayers()):
                # the static graph draws its dropout masks from its own generator, which
                # paddle.seed does not reset: the same seed would no longer give the same run
                raise ConfigError(f"train.to_static: {cfg['model']} has dropout, whose static-graph masks "
                                "are not reproducible from train.seed; use it for networks without dropout")
            model = paddle.jit.to_static(model, full_graph=True)
        opt, sched = self._optimizer(model, steps_per_epoch)
        ema = None
        if cfg["ema"]:
            ema = WeightEMA(model, new_network(), cfg["ema"])
        scored = ema.shadow if ema is not None else model  # the network the holdout judges and that is saved
        n_pos = int(train_split.labels.sum())
        pos_weight = None
        if cfg["class_balance"] and n_pos:
            pos_weight = paddle.to_tensor([(len(train_split) - n_pos) / n_pos], dtype="float32")
        loss_fn = paddle.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

        start, history, best, best_file = 0, [], None, None
        resumed = self._load_checkpoint(ckpt_dir)
        if resumed is not None:
            meta, state = resumed
            model.set_state_dict(state["model"])
            with warnings.catch_warnings():
                # LinearWarmup keeps its inner schedule's state under a key of its own, which it
                # restores itself; Paddle's base class still warns that the key is "unused"
                warnings.filterwarnings("ignore", message="There are some unused values in state_dict")
                opt.set_state_dict(state["opt"])
                sched.set_state_dict(state["sched"])
            if ema is not None:
                ema.set_state_dict(state["ema"])
            start, history, best = meta["epoch"], meta["history"], meta.get("best")
            best_file = meta.get("best_file")
            print(f"resuming from the checkpoint of epoch {start} of {cfg['epochs']}")
        else:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

        shutil.rmtree(live_dir, ignore_errors=True)
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
        for rec in history:  # replay what the checkpoint remembers, so the curves are whole
            self._log(live, rec)
        print(f"training {cfg['model']} on {device} (amp {amp_mode}): {len(train_split)} images, "
              f"{len(hold_split)} held out, {steps_per_epoch} steps/epoch, epochs {start + 1}..{cfg['epochs']}")
        t_start = time.perf_counter()
        for epoch in range(start, int(cfg["epochs"])):
            paddle.seed(seed * 100003 + epoch)  # dropout etc.: a function of (seed, epoch)
            train_ds.set_epoch(epoch)
            model.train()
            t0, total, n = time.perf_counter(), 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch", dynamic_ncols=True)
            for x, y in bar:
                with amp_ctx():
                    out = model(x)
                    loss = training_loss(out, y, loss_fn)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.clear_grad()
                sched.step()
                if ema is not None:
                    ema.update()
                lv = float(loss)
                if not math.isfinite(lv):
                    raise RunError(f"training diverged: loss is {lv} at epoch {epoch + 1} "
                                    f"(lower train.lr for {cfg['model']})")
                total += lv * len(y)
                n += len(y)
                bar.set_postfix(loss=f"{total / n:.4f}")
            rec = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "lr": float(sched.get_lr()),
                   "epoch_seconds": time.perf_counter() - t0}
            if hold_loader is not None:
                hm = holdout_metrics(hold_split.labels, predict_probs(scored, hold_loader, amp_ctx))
                rec.update({f"holdout_{k}": v for k, v in hm.items()})
            history.append(rec)
            self._log(live, rec)
            print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

            score = self._selection_score(rec)
            best_state = None
            if cfg["select"] == "last" or hold_loader is None or best is None or score > tuple(best["score"]):
                best = {"epoch": epoch + 1, "score": list(score)}
                best_state = scored.state_dict()
            best_file = self._save_checkpoint(ckpt_dir, model, opt, sched, {
                "fingerprint": self.fp, "epoch": epoch + 1, "history": history, "best": best, "config": cfg},
                ema, best_state)["best_file"]
        if best is None or not best_file:
            raise ConfigError(f"train.epochs is {cfg['epochs']}: no epoch trained, no model to save")
        train_seconds = sum(r["epoch_seconds"] for r in history)

        threshold = self._threshold(scored, hold_split, hold_loader, amp_ctx, ckpt_dir / best_file)
        info = {
            "model": cfg["model"], "image_size": cfg["image_size"], "input_size": cfg["input_size"],
            "threshold": threshold, "threshold_rule": str(cfg["threshold"]),
            "selected_epoch": best["epoch"], "epochs": cfg["epochs"], "device": device, "amp": amp_mode,
            "train_seconds": round(train_seconds, 2), "n_train": len(train_split), "n_holdout": len(hold_split),
            "config": cfg,
        }
        with atomic_dir(model_dir) as tmp:  # weights and model.json appear together, or not at all
            shutil.copyfile(ckpt_dir / best_file, tmp / MODEL_WEIGHTS)
            (tmp / "model.json").write_text(json.dumps(info, indent=1))
        live.summary = {**{k: v for k, v in history[best["epoch"] - 1].items() if k != "epoch"},
                        "selected_epoch": best["epoch"], "train_seconds": round(train_seconds, 2)}
        live.make_summary()
        live.end()
        print(f"saved {model_dir / MODEL_WEIGHTS} (epoch {best['epoch']}); "
              f"this run trained for {time.perf_counter() - t_start:.1f}s")
        return info

    def _threshold(self, scored, hold_split, hold_loader, amp_ctx, weights: Path) -> float:
        """``train.threshold`` as a number: itself, or its rule applied to the holdout's
        predictions by the saved network (never the validation set)."""
        from palm.metrics import choose_threshold
        from palm.weights import load_state, to_paddle

        rule = self.cfg["threshold"]
        if isinstance(rule, float):
            return rule
        scored.set_state_dict(to_paddle(load_state(weights)))
        t = choose_threshold(hold_split.labels, predict_probs(scored, hold_loader, amp_ctx), rule)
        print(f"threshold {t:.4f}: {rule} on the {len(hold_split)}-image holdout")
        return t

    def _selection_score(self, rec: dict) -> tuple:
        """Larger is better: the holdout's accuracy, loss or AUC as ``train.select_by`` says."""
        loss = -rec.get("holdout_loss", 0.0)
        auc = rec.get("holdout_auc", 0.0)
        return {"loss": (loss,),
                "accuracy": (rec.get("holdout_accuracy", 0.0), loss),
                "auc": (auc if math.isfinite(auc) else 0.0, loss)}[self.cfg["select_by"]]

    @staticmethod
    def _log(live, rec: dict) -> None:
        for key, value in rec.items():
            if key != "epoch" and value is not None and math.isfinite(value):
                live.log_metric(key, value)
        live.next_step()


def _remove_unlisted(ckpt_dir: Path, meta: dict) -> None:
    """Remove the weights files (and temporary files) of ``ckpt_dir`` that ``meta`` does not name."""
    keep = {meta.get("state_file"), meta.get("best_file"), "checkpoint.json"}
    for p in ckpt_dir.iterdir():
        if p.name not in keep and (p.suffix == ".safetensors" or p.name.startswith(".") or
                                   p.name.endswith((".tmp", ".pdckpt", ".pdparams"))):
            with contextlib.suppress(OSError):
                p.unlink()


def main(params: dict) -> None:
    Trainer(params).run()
