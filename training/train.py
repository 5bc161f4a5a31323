"""Training loop for the nets in :mod:`models.nets` (classification and segmentation).

What it does, and why:

* **Deterministic**: one seed drives numpy, torch, the shuffling generator and the
  augmentation; deterministic kernels are requested, so two CPU runs with the same
  config give bit-identical weights.
* **Augmentation in torch** (flips, a small random affine, gain/offset jitter) applied
  to whole batches; masks follow the image with nearest-neighbour sampling.
* **Imbalance**: the positive class is weighted by negatives/positives (BCE
  ``pos_weight``) or inverse class frequency (cross-entropy weights).
* **Segmentation loss**: cross-entropy plus soft Dice on the foreground classes
  (Dice alone is unstable on empty slices; CE alone under-segments small lesions).
* **CAM localisation loss** (optional, ``cam_loss_weight``, when lesion masks exist):
  for positive images, cross-entropy between the spatial softmax of the class
  activation map and the share of the lesion in each CAM cell.  It constrains only
  where the map peaks, not its mean, so it does not fight the image-level loss; the
  dense signal makes a small classifier learn the lesion (not its context) far faster.
* **AdamW + cosine decay** per step; **early stopping** on the validation metric
  (AUC or mean Dice); ``best.pt`` and ``last.pt`` checkpoints, ``resume`` continues
  from ``last.pt``; a CSV log per epoch; a progress bar with loss and metric.
* **Mixed precision** (autocast + GradScaler) on CUDA only; CPU runs in float32.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.nets import build_net
from training.config import TrainConfig, TrainingConfig
from training.datasets import ArraySet
from training.metrics import dice, roc_auc

__all__ = [
    "TrainResult",
    "augment_batch",
    "build_model",
    "cam_localisation_loss",
    "predict_torch",
    "seed_everything",
    "segmentation_loss",
    "train_model",
]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def build_model(cfg: TrainingConfig) -> nn.Module:
    """The net named by the manifest, with channels and classes filled in."""
    m = cfg.manifest
    kwargs: dict[str, Any] = dict(m.model.arch_kwargs)
    kwargs.setdefault("in_channels", m.input.channels)
    kwargs.setdefault("num_classes", m.num_classes)
    return build_net(m.model.arch, **kwargs)


def augment_batch(
    x: Tensor, mask: Tensor | None, cfg: TrainConfig, gen: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Random flips, small affine and intensity jitter, the same geometry for the mask."""
    n = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> Tensor:
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(dev)

    if cfg.hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if mask is not None:
            mask = torch.where(flip[:, None, None], mask.flip(-1), mask)
    if cfg.vflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-2), x)
        if mask is not None:
            mask = torch.where(flip[:, None, None], mask.flip(-2), mask)
    if cfg.max_rotate_deg > 0 or cfg.max_scale > 0 or cfg.max_shift > 0:
        ang = u(-cfg.max_rotate_deg, cfg.max_rotate_deg) * math.pi / 180
        scale = 1 + u(-cfg.max_scale, cfg.max_scale)
        tx, ty = u(-cfg.max_shift, cfg.max_shift) * 2, u(-cfg.max_shift, cfg.max_shift) * 2
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if mask is not None:
            m = F.grid_sample(
                mask[:, None].float(),
                grid,
                mode="nearest",
                padding_mode="zeros",
                align_corners=False,
            )
            mask = m[:, 0].round().long()
    if cfg.intensity_jitter > 0:
        j = cfg.intensity_jitter
        x = x * (1 + u(-j, j))[:, None, None, None] + u(-j, j)[:, None, None, None]
    return x, mask


def segmentation_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy + (1 - soft Dice) over the foreground classes, batch-pooled."""
    ce = F.cross_entropy(logits, target, weight=weight)
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    soft_dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1 - soft_dice).mean()


def cam_localisation_loss(cam: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Spatial-softmax cross-entropy of ``cam`` (N, h, w) against mask area per cell.

    Only positive images with a non-empty mask contribute; zero when there are none.
    """
    h, w = cam.shape[-2:]
    share = F.adaptive_avg_pool2d(mask[:, None].float(), (h, w))[:, 0]
    total = share.flatten(1).sum(1)
    keep = (labels > 0) & (total > 0)
    if not bool(keep.any()):
        return cam.sum() * 0.0
    target = share[keep].flatten(1) / total[keep, None]
    logp = F.log_softmax(cam[keep].float().flatten(1), dim=1)
    return -(target * logp).sum(1).mean()


@dataclass
class TrainResult:
    """The trained net (best validation epoch) and what happened."""

    net: nn.Module
    best_metric: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None
    steps: int = 0


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def predict_torch(
    net: nn.Module, images: np.ndarray, batch_size: int = 64, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``net`` in eval mode: (probabilities or class maps, CAM or None).

    Classifiers: sigmoid probabilities ``(N, K)`` and raw CAM ``(N, K, h, w)``.
    Segmenters: softmax probabilities ``(N, K, H, W)`` and None.
    """
    dev = device or next(net.parameters()).device
    net.eval()
    probs, cams = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(dev)
        out = net(x)
        if isinstance(out, tuple):
            probs.append(torch.sigmoid(out[0]).float().cpu().numpy())
            cams.append(out[1].float().cpu().numpy())
        else:
            probs.append(out.float().softmax(1).cpu().numpy())
    return np.concatenate(probs), (np.concatenate(cams) if cams else None)


def _validate(net: nn.Module, data: ArraySet, task: str, dev: torch.device) -> float:
    """AUC (classification, first label) or mean Dice per case (segmentation)."""
    probs, _ = predict_torch(net, data.images, device=dev)
    if task == "classification":
        if len(set(data.labels.tolist())) < 2:
            return float("nan")
        return roc_auc(data.labels, probs[:, 0])
    assert data.masks is not None
    pred = probs.argmax(1)
    per_case: dict[str, list[int]] = {}
    for i, g in enumerate(data.groups):
        per_case.setdefault(g, []).append(i)
    return float(np.mean([dice(pred[ix] > 0, data.masks[ix] > 0) for ix in per_case.values()]))


def train_model(
    cfg: TrainingConfig, train_set: ArraySet, val_set: ArraySet, run_dir: Path | None = None
) -> TrainResult:
    """Train the configured net on ``train_set``, early-stopping on ``val_set``."""
    tc = cfg.train
    task = cfg.manifest.model.task
    if task == "segmentation" and train_set.masks is None:
        raise ValueError("segmentation training needs masks in the training set")
    seed_everything(cfg.run.seed)
    torch.set_num_threads(tc.threads)
    dev = _device(cfg.run.device)
    net = build_model(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_set) / tc.batch_size))
    total = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total = min(total, tc.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    use_amp = tc.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # Class weights from the training labels (imbalance).
    n_classes = cfg.manifest.num_classes
    pos_weight: Tensor | None = None
    ce_weight: Tensor | None = None
    if tc.class_weighting:
        if task == "classification" and n_classes == 1:
            pos = float(train_set.labels.sum())
            neg = float(len(train_set) - pos)
            pos_weight = torch.tensor([neg / max(pos, 1.0)], device=dev)
        elif task == "segmentation" and train_set.masks is not None:
            counts = np.bincount(train_set.masks.ravel(), minlength=n_classes).astype(np.float64)
            w = np.sqrt(counts.sum() / np.maximum(counts, 1) / n_classes)  # tempered inverse freq.
            ce_weight = torch.tensor(w / w.mean(), dtype=torch.float32, device=dev)

    gen = torch.Generator().manual_seed(cfg.run.seed)
    start_epoch, step = 0, 0
    best_metric, best_epoch, bad_epochs = -math.inf, -1, 0
    history: list[dict[str, float]] = []
    best_state: dict[str, Tensor] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        last = run_dir / "last.pt"
        if tc.resume and last.is_file():
            ck = torch.load(last, map_location=dev, weights_only=False)
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            gen.set_state(ck["gen"])
            start_epoch, step = ck["epoch"] + 1, ck["step"]
            best_metric, best_epoch, bad_epochs = ck["best_metric"], ck["best_epoch"], ck["bad"]
            history = ck["history"]
            best_state = ck["best_state"]

    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    masks = None if train_set.masks is None else torch.from_numpy(train_set.masks.astype(np.int64))
    use_cam_loss = task == "classification" and tc.cam_loss_weight > 0 and masks is not None
    progress = _progress(tc.progress, total, initial=step)
    try:
        for epoch in range(start_epoch, tc.epochs):
            if tc.max_steps is not None and step >= tc.max_steps:
                break
            net.train()
            t0 = time.monotonic()
            order = torch.randperm(len(train_set), generator=gen)
            losses: list[float] = []
            for b in range(steps_per_epoch):
                if tc.max_steps is not None and step >= tc.max_steps:
                    break
                idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                if len(idx) < 2 and len(train_set) > 1:
                    continue  # batch norm needs two samples
                x = images[idx].to(dev)
                y = labels[idx].to(dev)
                m = None if masks is None else masks[idx].to(dev)
                if tc.augment:
                    x, m = augment_batch(x, m, tc, gen)
                with torch.autocast(device_type=dev.type, enabled=use_amp):
                    out = net(x)
                    if task == "segmentation":
                        assert m is not None and not isinstance(out, tuple)
                        loss = segmentation_loss(out, m, ce_weight)
                    else:
                        logits = out[0] if isinstance(out, tuple) else out
                        if n_classes == 1:
                            loss = F.binary_cross_entropy_with_logits(
                                logits[:, 0].float(), y.float(), pos_weight=pos_weight
                            )
                        else:
                            loss = F.cross_entropy(logits.float(), y, weight=ce_weight)
                        if use_cam_loss and isinstance(out, tuple):
                            assert m is not None
                            cam_k = out[1][torch.arange(len(y)), y.clamp(max=out[1].shape[1] - 1)]
                            loss = loss + tc.cam_loss_weight * cam_localisation_loss(cam_k, m, y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.4f}")
            metric = _validate(net, val_set, task, dev)
            row = {
                "epoch": float(epoch),
                "step": float(step),
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_metric": metric,
                "lr": float(sched.get_last_lr()[0]),
                "seconds": time.monotonic() - t0,
            }
            history.append(row)
            if progress is not None:
                progress.set_postfix(
                    epoch=epoch, loss=f"{row['train_loss']:.4f}", val=f"{metric:.4f}"
                )
            improved = not math.isnan(metric) and metric > best_metric
            if improved:
                best_metric, best_epoch, bad_epochs = metric, epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif math.isnan(metric) and best_metric == -math.inf:
                # no usable validation metric yet (e.g. one class only): keep the latest
                best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad_epochs += 1
            if run_dir is not None:
                _write_log(run_dir / "log.csv", history)
                if improved:
                    torch.save(best_state, run_dir / "best.pt")
                torch.save(
                    {
                        "net": net.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "gen": gen.get_state(),
                        "epoch": epoch,
                        "step": step,
                        "best_metric": best_metric,
                        "best_epoch": best_epoch,
                        "bad": bad_epochs,
                        "history": history,
                        "best_state": best_state,
                    },
                    run_dir / "last.pt",
                )
            if bad_epochs >= tc.patience:
                break
    finally:
        if progress is not None:
            progress.close()
    net.load_state_dict(best_state)
    net.eval()
    if best_metric == -math.inf:
        best_metric = float("nan")
    return TrainResult(net, best_metric, best_epoch, history, run_dir, step)


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
