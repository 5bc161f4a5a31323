"""Tiny CPU training runs: the loss falls, seeds make runs identical, resume continues."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.config import TrainConfigError, TrainingConfig, load_train_config, parse_train_config
from training.datasets import ct_phantom_slices, radiograph_phantom_set
from training.train import augment_batch, segmentation_loss, train_model

REPO = Path(__file__).resolve().parents[2]


def _cfg(name: str, **train: Any) -> TrainingConfig:
    data = tomllib.loads((REPO / "config/train" / f"{name}.toml").read_text())
    data["run"]["seed"] = 11
    data["train"].update({"progress": False, "threads": 1, **train})
    data["export"] = {}
    if name == "cxr-nodule":
        data["manifest"]["model"]["arch_kwargs"] = {"base_width": 4}
        data["manifest"]["input"]["size"] = [32, 32]
    else:
        data["manifest"]["model"]["arch_kwargs"] = {"base_channels": 4, "depth": 2}
        data["manifest"]["input"]["size"] = [32, 32]
    return parse_train_config(data)


def _cls_data(cfg: TrainingConfig) -> tuple[Any, Any]:
    full = radiograph_phantom_set(
        24, 3, cfg.manifest.input, native_size=64, contrast_range=(800, 1200)
    )
    return full.subset(range(16)), full.subset(range(16, 24))


def test_classification_loss_falls() -> None:
    cfg = _cfg("cxr-nodule", epochs=8, batch_size=8, lr=3e-3, augment=False, patience=100)
    train, val = _cls_data(cfg)
    res = train_model(cfg, train, val)
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])


def test_segmentation_loss_falls() -> None:
    cfg = _cfg("ct-lesion", epochs=12, batch_size=4, lr=5e-3, augment=False, patience=100)
    data = ct_phantom_slices(2, 4, cfg.manifest.input, shape=(8, 32, 32), n_lesions=2)
    res = train_model(cfg, data, data)
    losses = [h["train_loss"] for h in res.history]
    dices = [h["val_metric"] for h in res.history]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    assert dices[-1] > dices[0] + 0.05


def test_same_seed_gives_identical_weights_and_other_seed_differs() -> None:
    cfg = _cfg("cxr-nodule", epochs=1, batch_size=8, max_steps=2)
    train, val = _cls_data(cfg)
    a = train_model(cfg, train, val).net.state_dict()
    b = train_model(cfg, train, val).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 12})})
    c = train_model(other, train, val).net.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoints_log_and_resume(tmp_path: Path) -> None:
    cfg = _cfg("cxr-nodule", epochs=2, batch_size=8, patience=100)
    train, val = _cls_data(cfg)
    first = train_model(cfg, train, val, run_dir=tmp_path)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs
    longer = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"epochs": 3, "resume": True})}
    )
    resumed = train_model(longer, train, val, run_dir=tmp_path)
    assert len(resumed.history) == 3
    assert resumed.history[:2] == first.history
    assert resumed.steps == first.steps + 2


def test_augmentation_moves_mask_with_image() -> None:
    cfg = _cfg("ct-lesion", hflip=True, max_rotate_deg=0.0, max_scale=0.0, max_shift=0.0)
    cfg_train = cfg.train.model_copy(update={"intensity_jitter": 0.0})
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 4:8, 1:5] = 1.0
    m = (x[:, 0] > 0).long()
    xa, ma = augment_batch(x, m, cfg_train, torch.Generator().manual_seed(0))
    assert ma is not None
    assert torch.equal((xa[:, 0] > 0.5).long(), ma)
    assert any(not torch.equal(xa[i], x[i]) for i in range(8))  # some were flipped


def test_segmentation_loss_is_small_for_a_perfect_prediction() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    wrong = -perfect
    assert segmentation_loss(perfect, target) < 0.01 < segmentation_loss(wrong, target)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = re.sub(
        r"(?m)^epochs = \d+", "epochs = 0", (REPO / "config/train/cxr-nodule.toml").read_text()
    )
    bad.write_text(text)
    with pytest.raises(TrainConfigError, match=r"train\.epochs"):
        load_train_config(bad)
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_train_config(tmp_path / "none.toml")


def test_shipped_configs_are_valid() -> None:
    for name in ("cxr-nodule", "ct-lesion"):
        cfg = load_train_config(REPO / "config/train" / f"{name}.toml")
        assert cfg.eval.seed != cfg.data.seed  # the test set is held out


def test_cli_reports_user_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.ops.cli import main

    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("airnode: ") and "does not exist" in err and len(err.splitlines()) == 1
    cfg = str(REPO / "config/train/cxr-nodule.toml")
    assert main(["evaluate", cfg, "--package", str(tmp_path / "nopkg")]) == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "Traceback" not in err


def test_cam_localisation_loss_prefers_the_lesion_cell() -> None:
    from training.train import cam_localisation_loss

    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[0, 0:8, 24:32] = 1  # entirely inside CAM cell (0, 3) of a 4x4 map
    good = torch.zeros(1, 4, 4)
    good[0, 0, 3] = 5.0
    bad = torch.zeros(1, 4, 4)
    bad[0, 3, 0] = 5.0
    yes = torch.tensor([1])
    assert cam_localisation_loss(good, mask, yes) < cam_localisation_loss(bad, mask, yes)
    # -log softmax at the lesion cell, by hand: 15 cells at 0, one at 5
    expected = -(5.0 - np.log(np.exp(5.0) + 15))
    assert float(cam_localisation_loss(good, mask, yes)) == pytest.approx(expected, rel=1e-5)
    # negatives and empty masks contribute nothing
    assert float(cam_localisation_loss(bad, mask, torch.tensor([0]))) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_training_on_gpu() -> None:
    cfg = _cfg("cxr-nodule", epochs=4, batch_size=8, lr=3e-3, augment=False, patience=100)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": "cuda"})})
    train, val = _cls_data(cfg)
    res = train_model(cfg, train, val)
    assert next(res.net.parameters()).is_cuda
    losses = [h["train_loss"] for h in res.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_single_class_validation_keeps_trained_weights() -> None:
    cfg = _cfg("cxr-nodule", epochs=2, batch_size=8, patience=100)
    train, val = _cls_data(cfg)
    negatives = val.subset([i for i in range(len(val)) if val.labels[i] == 0])
    res = train_model(cfg, train, negatives)
    assert np.isnan(res.best_metric) and res.best_epoch == 1
    init = _cfg("cxr-nodule", epochs=1, max_steps=1)
    from training.train import build_model, seed_everything

    seed_everything(init.run.seed)
    fresh = build_model(init).state_dict()
    trained = res.net.state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)
