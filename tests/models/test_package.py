"""Model packages: manifest round trip, one-line errors naming the key, discovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.package import ManifestError, find_packages, load_package, write_manifest
from tests.models.helpers import manifest, write_package_dir


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    data = manifest(
        arch_kwargs={"growth_rate": 8, "block_config": [1, 2]},
        window_center=40.0,
        window_width=400.0,
        channels=3,
        mean=[0.1, 0.2, 0.3],
        std=[1.0, 2.0, 3.0],
        labels=[
            {
                "name": "nodule",
                "code": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
                "threshold": 0.3,
                "finding_site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung structure"},
            }
        ],
    )
    pkg = load_package(write_package_dir(tmp_path / "p", data))
    m = pkg.manifest
    assert m.model.arch_kwargs == {"growth_rate": 8, "block_config": [1, 2]}
    assert m.input.window == (40.0, 400.0)
    assert m.input.mean == [0.1, 0.2, 0.3]
    assert m.output.labels[0].threshold == 0.3
    assert m.output.labels[0].finding_site is not None
    assert pkg.identity.device_uid == "1.2.826.0.1.3680043.8.498.99"
    assert pkg.identity.task == "classification"
    assert m.output_names == ("logits", "cam") and m.num_classes == 1
    assert pkg.engines_dir.is_dir()


def test_segmentation_has_background_class(tmp_path: Path) -> None:
    pkg = load_package(write_package_dir(tmp_path / "s", manifest("segmentation", "unet2d")))
    assert pkg.manifest.num_classes == 2
    assert pkg.manifest.output_names == ("mask_logits",)


def _break(data: dict[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    data[section][key] = value
    return data


BROKEN = [
    (lambda d: _break(d, "model", "device_uid", "1.2.abc"), "model.device_uid"),
    (lambda d: _break(d, "model", "task", "detection"), "model.task"),
    (lambda d: _break(d, "input", "size", [4, 4]), "input.size"),
    (lambda d: _break(d, "input", "std", [0.0]), "input.std"),
    (lambda d: _break(d, "input", "window_center", 40.0), "window_width go together"),
    (lambda d: _break(d, "output", "labels", []), "output.labels"),
    (lambda d: _break(d, "model", "colour", "red"), "model.colour"),
    (lambda d: {k: v for k, v in d.items() if k != "input"}, "input"),
]


@pytest.mark.parametrize(("mutate", "key"), BROKEN)
def test_broken_manifest_gives_one_line_error_naming_the_key(
    mutate: Any, key: str, tmp_path: Path
) -> None:
    good = manifest()
    write_package_dir(tmp_path / "p", good)
    bad = mutate(manifest())
    # write the broken TOML by hand: write_manifest itself refuses invalid data
    import tomllib

    from models.package import _toml_value

    lines = []
    for section, body in bad.items():
        if section == "output":
            for label in body.get("labels", []):
                lines.append("[[output.labels]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in label.items()]
            if not body.get("labels"):
                lines += ["[output]", "labels = []"]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    (tmp_path / "p" / "manifest.toml").write_text("\n".join(lines))
    tomllib.loads("\n".join(lines))  # the file is valid TOML; the content is not
    with pytest.raises(ManifestError) as info:
        load_package(tmp_path / "p")
    msg = str(info.value)
    assert "\n" not in msg
    assert key in msg
    assert str(tmp_path / "p" / "manifest.toml") in msg


def test_not_toml_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.toml"):
        load_package(tmp_path)
    (tmp_path / "manifest.toml").write_text("[model\nname=")
    with pytest.raises(ManifestError, match="manifest error") as info:
        load_package(tmp_path)
    assert "\n" not in str(info.value)
    write_package_dir(tmp_path / "x", manifest(), onnx=False)
    with pytest.raises(ManifestError, match=r"model\.onnx is missing"):
        load_package(tmp_path / "x")


def test_write_manifest_refuses_invalid_data(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"model\.device_uid"):
        write_manifest(tmp_path, _break(manifest(), "model", "device_uid", "x"))
    assert not (tmp_path / "manifest.toml").exists()


def test_find_packages_skips_broken_and_keeps_highest_version(tmp_path: Path) -> None:
    for folder, version in (("a-1", "1.2.0"), ("a-2", "1.10.0"), ("a-0", "0.9")):
        data = manifest()
        data["model"]["version"] = version
        write_package_dir(tmp_path / folder, data)
    seg = write_package_dir(tmp_path / "seg", manifest("segmentation", "unet2d"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.toml").write_text("[model]\nname = 'x'\n")
    found = find_packages([tmp_path, tmp_path / "does-not-exist"])
    assert set(found) == {"test-classification", "test-segmentation"}
    assert found["test-classification"].version == "1.10.0"
    assert find_packages([seg])["test-segmentation"].path == seg
