"""Phantom ground truth: the masks, labels and value ranges the evaluation relies on."""

from __future__ import annotations

import numpy as np
import pytest

from models.phantoms import (
    CT_RESCALE_INTERCEPT,
    DX_MAX_VALUE,
    ct_phantom,
    ct_phantoms,
    radiograph_phantom,
    radiograph_phantoms,
)


def test_radiograph_same_seed_same_image_and_different_seed_differs() -> None:
    a = radiograph_phantom(7, size=64, nodule=True)
    b = radiograph_phantom(7, size=64, nodule=True)
    c = radiograph_phantom(8, size=64, nodule=True)
    assert np.array_equal(a.image, b.image)
    assert a.centre == b.centre
    assert not np.array_equal(a.image, c.image)


def test_radiograph_is_12_bit_and_positive_nodule_lies_in_lung() -> None:
    for seed in range(10):
        p = radiograph_phantom(seed, size=96, nodule=True)
        assert p.image.dtype == np.uint16
        assert p.image.max() <= DX_MAX_VALUE
        assert p.label == 1 and p.centre is not None
        assert p.mask.any()
        assert p.lung_mask[p.mask].all()
        # The mask is the disc of the stated radius around the stated centre.
        rows, cols = np.nonzero(p.mask)
        d = np.hypot(rows - p.centre[0], cols - p.centre[1])
        assert d.max() <= p.radius + 1e-9
        assert abs(p.mask.sum() - np.pi * p.radius**2) < 2 * np.pi * p.radius + 4


def test_radiograph_nodule_is_brighter_than_its_surroundings() -> None:
    p = radiograph_phantom(3, size=128, nodule=True, noise_sigma=0.0)
    ring = np.zeros_like(p.mask)
    r0, c0 = p.centre or (0, 0)
    yy, xx = np.mgrid[0 : p.mask.shape[0], 0 : p.mask.shape[1]]
    d = np.hypot(yy - r0, xx - c0)
    ring = (d > p.radius + 2) & (d < p.radius + 6) & p.lung_mask
    assert p.image[p.mask].mean() > p.image[ring].mean() + 0.3 * p.contrast


def test_negative_radiograph_has_empty_mask() -> None:
    p = radiograph_phantom(1, size=64, nodule=False)
    assert p.label == 0 and p.centre is None and not p.mask.any()


def test_radiograph_set_has_exact_class_balance_and_patient_ids() -> None:
    items = list(radiograph_phantoms(10, 5, size=48, positive_fraction=0.3, images_per_patient=2))
    assert sum(p.label for p in items) == 3
    assert len({p.patient_id for p in items}) == 5
    assert items[0].patient_id == items[1].patient_id


def test_ct_is_hounsfield_with_rescale_and_lesion_masks_match() -> None:
    v = ct_phantom(4, shape=(16, 64, 64), n_lesions=2)
    assert v.stored.dtype == np.uint16
    assert v.rescale_intercept == CT_RESCALE_INTERCEPT
    hu = v.hu
    assert hu.min() >= -1024 and hu.max() < 3072
    # air outside the body, lung well below soft tissue
    assert np.median(hu[0, 0, :]) < -900
    assert len(v.lesions) == 2 and v.mask.any()
    assert v.lesion_volume_mm3 == pytest.approx(v.mask.sum() * 3.0 * 2.5 * 2.5)
    for lesion in v.lesions:
        z, y, x = (round(c) for c in lesion.centre)
        assert v.mask[z, y, x] == 1
        # lesion HU sits near its stated value (noise averaged out)
        assert abs(float(np.mean(hu[v.mask == 1])) - np.mean([les.hu for les in v.lesions])) < 40


def test_ct_without_lesions_has_empty_mask_and_sets_are_reproducible() -> None:
    assert ct_phantom(2, shape=(8, 32, 32), n_lesions=0).label == 0
    a = [v.stored for v in ct_phantoms(2, 9, shape=(8, 32, 32))]
    b = [v.stored for v in ct_phantoms(2, 9, shape=(8, 32, 32))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 8},
        {"radius_range": (0.3, 0.4)},
        {"contrast_range": (0.0, 1.0)},
        {"noise_sigma": -1},
    ],
)
def test_radiograph_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        radiograph_phantom(0, **kwargs)  # type: ignore[arg-type]


def test_ct_rejects_bad_shape_and_seed() -> None:
    with pytest.raises(ValueError, match="shape"):
        ct_phantom(0, shape=(2, 64, 64))
    with pytest.raises(ValueError, match="seed"):
        ct_phantom(-1)


def test_the_demo_and_the_test_studies_draw_phantoms_without_training_code() -> None:
    """One module of phantoms, in the serving library: ``airnode demo`` and
    ``node.ops.synthetic`` import no training code (nor torch)."""
    import subprocess
    import sys

    code = (
        "import sys; import node.ops.demo, node.ops.synthetic, models.phantoms;"
        "from node.ops.demo import demo_studies; next(demo_studies(dx=1, ct=0, dx_size=64));"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'torch')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
