"""Routing rules evaluated on series headers: values, regexes, image properties, AND/OR."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID

from node.config import RouteConfig
from node.schedule.routing import (
    RouteMatch,
    Router,
    RoutingError,
    evaluate_dataset,
    read_header,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def route(name: str, model: str, send_to: list[str] | None = None, **match: Any) -> RouteConfig:
    return RouteConfig(name=name, model=model, match=match, send_to=send_to or [])


def header(**attrs: Any) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def fired(router: Router, ds: Dataset | None, calling_ae: str | None = None) -> list[str]:
    return [m.route for m in router.evaluate(router.attributes(ds, calling_ae=calling_ae))]


def test_value_list_is_or_and_keys_are_and() -> None:
    router = Router(
        [route("cxr", "cxr-nodule", Modality=["DX", "CR"], PhotometricInterpretation="MONOCHROME2")]
    )
    assert fired(router, header(Modality="CR", PhotometricInterpretation="MONOCHROME2")) == ["cxr"]
    assert fired(router, header(Modality="DX", PhotometricInterpretation="MONOCHROME2")) == ["cxr"]
    # One key fails: the AND fails.
    assert fired(router, header(Modality="DX", PhotometricInterpretation="RGB")) == []
    assert fired(router, header(Modality="CT", PhotometricInterpretation="MONOCHROME2")) == []


def test_several_rules_fire_in_config_order_with_their_destinations() -> None:
    router = Router(
        [
            route("all-ct", "ct-lesion", ["pacs"], Modality="CT"),
            route(
                "chest-ct",
                "ct-nodule",
                ["pacs", "research"],
                Modality="CT",
                BodyPartExamined="CHEST",
            ),
            route("mr", "mr-model", Modality="MR"),
        ]
    )
    matches = router.evaluate(router.attributes(header(Modality="CT", BodyPartExamined="CHEST")))
    assert matches == [
        RouteMatch("all-ct", "ct-lesion", ("pacs",)),
        RouteMatch("chest-ct", "ct-nodule", ("pacs", "research")),
    ]
    assert fired(router, header(Modality="CT", BodyPartExamined="HEAD")) == ["all-ct"]


def test_empty_match_fires_for_everything() -> None:
    router = Router([route("catch-all", "m")])
    assert fired(router, header(Modality="OT")) == ["catch-all"]
    assert fired(router, None) == ["catch-all"]


def test_text_compare_ignores_case_and_dicom_padding() -> None:
    router = Router([route("r", "m", BodyPartExamined=["chest"])])
    assert fired(router, header(BodyPartExamined="CHEST ")) == ["r"]
    assert fired(router, header(BodyPartExamined="CHESTWALL")) == []


def test_regex_is_searched_case_insensitively() -> None:
    router = Router([route("r", "m", SeriesDescription="re:thorax|chest")])
    assert fired(router, header(SeriesDescription="CT THORAX 1.0 B70f")) == ["r"]
    assert fired(router, header(SeriesDescription="Lung Chest PA")) == ["r"]
    assert fired(router, header(SeriesDescription="Abdomen")) == []


def test_regex_anchors_work() -> None:
    router = Router([route("r", "m", SeriesDescription="re:^ax")])
    assert fired(router, header(SeriesDescription="AX T1")) == ["r"]
    assert fired(router, header(SeriesDescription="COR AX")) == []


def test_numbers_match_integer_and_decimal_string_values() -> None:
    router = Router([route("r", "m", Rows=[512, 1024], SliceThickness=[1.0])])
    ds = header(Rows=512, SliceThickness="1.00")
    assert fired(router, ds) == ["r"]
    assert fired(router, header(Rows=256, SliceThickness="1.0")) == []
    assert fired(router, header(Rows=1024, SliceThickness="5")) == []


def test_image_size_is_derived_from_rows_and_columns() -> None:
    router = Router([route("big", "m", ImageSize=["2048x2048", "3000x2500"])])
    assert fired(router, header(Rows=2048, Columns=2048)) == ["big"]
    assert fired(router, header(Rows=3000, Columns=2500)) == ["big"]
    assert fired(router, header(Rows=2500, Columns=3000)) == []
    assert fired(router, header(Rows=2048)) == []  # no Columns: no size


def test_image_size_regex_on_the_image_not_the_text() -> None:
    router = Router([route("cxr", "m", Modality="DX", ImageSize=r"re:^(1\d|2\d)\d\dx")])
    assert fired(router, header(Modality="DX", Rows=2048, Columns=1800)) == ["cxr"]
    assert fired(router, header(Modality="DX", Rows=512, Columns=512)) == []


def test_calling_ae_title_is_matched_from_the_association() -> None:
    router = Router([route("er", "m", CallingAETitle=["ER_CT1", "ER_CT2"])])
    assert fired(router, header(Modality="CT"), calling_ae="ER_CT2") == ["er"]
    assert fired(router, header(Modality="CT"), calling_ae="OTHER") == []
    assert fired(router, header(Modality="CT"), calling_ae=None) == []


def test_sop_class_uid_and_name() -> None:
    router = Router(
        [
            route("by-uid", "m", SOPClassUID=[CT_IMAGE]),
            route("by-name", "m", SOPClassName="re:^digital x-ray"),
        ]
    )
    assert fired(router, header(SOPClassUID=UID(CT_IMAGE))) == ["by-uid"]
    assert fired(router, header(SOPClassUID=UID(DX_IMAGE))) == ["by-name"]


def test_sop_class_from_defaults_when_header_lacks_it() -> None:
    router = Router([route("by-name", "m", SOPClassName="CT Image Storage")])
    attrs = router.attributes(header(Modality="CT"), defaults={"SOPClassUID": CT_IMAGE})
    assert [m.route for m in router.evaluate(attrs)] == ["by-name"]


def test_multi_valued_attribute_matches_any_value() -> None:
    router = Router([route("primary", "m", ImageType=["PRIMARY"])])
    assert fired(router, header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])) == ["primary"]
    assert fired(router, header(ImageType=["DERIVED", "SECONDARY"])) == []


def test_multi_valued_regex_per_value_and_on_the_joined_value() -> None:
    per_value = Router([route("r", "m", ImageType="re:^localizer$")])
    assert fired(per_value, header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])) == ["r"]
    joined = Router([route("r", "m", ImageType=r"re:^ORIGINAL\\PRIMARY\\")])
    assert fired(joined, header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])) == ["r"]
    assert fired(joined, header(ImageType=["DERIVED", "PRIMARY", "AXIAL"])) == []


def test_missing_attribute_fails_values_and_regexes() -> None:
    router = Router(
        [
            route("by-value", "m", BodyPartExamined=["CHEST"]),
            route("by-regex", "m", BodyPartExamined="re:.*"),
        ]
    )
    assert fired(router, header(Modality="DX")) == []
    assert fired(router, header(Modality="DX", BodyPartExamined="")) == []


def test_empty_string_accepts_missing_or_empty() -> None:
    router = Router([route("r", "m", BodyPartExamined=["CHEST", ""])])
    assert fired(router, header(Modality="DX")) == ["r"]
    assert fired(router, header(BodyPartExamined="")) == ["r"]
    assert fired(router, header(BodyPartExamined="CHEST")) == ["r"]
    assert fired(router, header(BodyPartExamined="HEAD")) == []


def test_defaults_fill_in_when_no_header_could_be_read() -> None:
    router = Router([route("ct", "m", Modality="CT")])
    attrs = router.attributes(None, defaults={"Modality": "CT", "SOPClassUID": CT_IMAGE})
    assert [m.route for m in router.evaluate(attrs)] == ["ct"]
    # The header wins over the defaults when it has a value.
    attrs = router.attributes(header(Modality="MR"), defaults={"Modality": "CT"})
    assert router.evaluate(attrs) == []


def test_explain_names_the_failing_condition() -> None:
    router = Router(
        [
            route("ct", "m", Modality="CT", Rows=[512]),
            route("any", "m2"),
        ]
    )
    why = router.explain(router.attributes(header(Modality="CT", Rows=256)))
    assert why["any"] is None
    assert why["ct"] is not None and why["ct"].startswith("Rows")


def test_models_are_listed_once_in_order() -> None:
    router = Router([route("a", "x"), route("b", "y"), route("c", "x")])
    assert router.models() == ["x", "y"]


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ({"Modaliti": "CT"}, "unknown attribute 'Modaliti'"),
        ({"ReferencedSeriesSequence": "x"}, "VR SQ"),
        ({"PixelData": "x"}, "cannot be matched"),
        ({"Modality": []}, "empty list"),
    ],
)
def test_bad_rules_are_refused_with_the_route_named(match: dict[str, Any], message: str) -> None:
    with pytest.raises(RoutingError) as exc:
        Router([route("ok", "m", Modality="CT"), RouteConfig(name="bad", model="m", match=match)])
    text = str(exc.value)
    assert message in text
    assert "routes[1] (bad)" in text
    assert "\n" not in text


def test_bad_regex_is_refused_by_the_config_already() -> None:
    with pytest.raises(ValueError, match="bad regular expression"):
        RouteConfig(name="r", model="m", match={"SeriesDescription": "re:(unclosed"})


def test_router_refuses_non_route_objects() -> None:
    with pytest.raises(TypeError, match=r"routes\[0\]"):
        Router([{"name": "r", "model": "m"}])  # type: ignore[list-item]


def test_read_header_skips_pixels_of_a_real_file() -> None:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = read_header(path)
    assert "PixelData" not in ds
    assert ds.Modality == "CT"
    matches = evaluate_dataset(
        [
            route("ct-128", "ct-lesion", Modality="CT", ImageSize="128x128"),
            route("ct-mono", "ct-lesion", PhotometricInterpretation="MONOCHROME2"),
            route("mr", "mr", Modality="MR"),
        ],
        ds,
        calling_ae="SCANNER",
    )
    assert [m.route for m in matches] == ["ct-128", "ct-mono"]
