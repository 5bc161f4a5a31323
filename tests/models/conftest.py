from __future__ import annotations

from pathlib import Path

import pytest

from models.package import ModelPackage, load_package
from tests.models.helpers import manifest, write_package_dir


@pytest.fixture
def fake_cls_package(tmp_path: Path) -> ModelPackage:
    return load_package(write_package_dir(tmp_path / "cls", manifest("classification")))


@pytest.fixture
def fake_seg_package(tmp_path: Path) -> ModelPackage:
    data = manifest("segmentation", arch="unet2d", size=(64, 64))
    return load_package(write_package_dir(tmp_path / "seg", data))
