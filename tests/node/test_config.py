"""Configuration: defaults, one-line errors naming the key, the example file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from node.config import (
    ConfigError,
    NodeConfig,
    RouteConfig,
    load_config,
    parse_config,
    priority_value,
)
from node.schedule.routing import Router

EXAMPLE = Path(__file__).parents[2] / "config" / "airnode.example.toml"


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    text = str(exc.value)
    assert "\n" not in text, text
    assert text.startswith("config error: ")
    return text


def test_defaults(tmp_path: Path) -> None:
    cfg = parse_config({}, base_dir=tmp_path)
    assert cfg.node.ae_title == "AIRNODE"
    assert cfg.node.host == "127.0.0.1" and cfg.node.port == 11112
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.node.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}"
    assert cfg.node.spool_dir == tmp_path / "data" / "spool"
    assert cfg.study.stable_after_s == 60 and cfg.study.force_after_s == 3600
    assert cfg.security.allowed_calling_aets == [] and cfg.security.tls is None
    assert cfg.destinations == [] and cfg.routes == []
    assert cfg.inference.backend == "auto"


def test_absolute_data_dir_and_database_url_are_kept(tmp_path: Path) -> None:
    cfg = parse_config(
        {"node": {"data_dir": "/srv/airnode", "database_url": "postgresql+psycopg://h/db"}},
        base_dir=tmp_path,
    )
    assert cfg.node.data_dir == Path("/srv/airnode")
    assert cfg.node.resolved_database_url == "postgresql+psycopg://h/db"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"port": 70000}}, r"^config error: node\.port: .*65535"),
        ({"node": {"port": "x"}}, r"^config error: node\.port: "),
        ({"node": {"log_level": "LOUD"}}, r"^config error: node\.log_level: "),
        ({"node": {"portt": 1}}, r"^config error: node\.portt: unknown key$"),
        ({"nodes": {}}, r"^config error: nodes: unknown key$"),
        ({"study": {"stable_after_s": -1}}, r"^config error: study\.stable_after_s: "),
        (
            {"study": {"stable_after_s": 100, "force_after_s": 10}},
            r"^config error: study: force_after_s must be >= stable_after_s$",
        ),
        ({"security": {"max_associations": 0}}, r"security\.max_associations: "),
        ({"security": {"tls": {"cert": "a.crt"}}}, r"security\.tls\.key: Field required"),
        ({"security": {"tls": {"cert": "a.crt", "key": "a.key"}}}, r"security\.tls: cert file"),
        ({"inference": {"backend": "cuda"}}, r"inference\.backend: "),
        ({"destinations": [{"name": "p"}]}, r"destinations\.0: a DICOM destination needs ae_title"),
        ({"routes": [{"name": "r"}]}, r"routes\.0\.model: Field required"),
        ({"routes": [{"name": "r", "model": "m", "mach": {}}]}, r"routes\.0\.mach: unknown key"),
    ],
)
def test_errors_are_one_line_and_name_the_key(data: dict[str, Any], expected: str) -> None:
    assert re.search(expected, error_of(data))


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "A" * 17, "BACK\\SLASH", "TAB\tAE", "ÄRZTE"],
)
def test_bad_ae_titles(bad: str) -> None:
    text = error_of({"node": {"ae_title": bad}})
    assert text.startswith("config error: node.ae_title: AE title")
    text = error_of({"security": {"allowed_calling_aets": ["OK", bad]}})
    assert "security.allowed_calling_aets" in text
    dest = {"name": "p", "ae_title": bad, "host": "h", "port": 104}
    assert "destinations.0.ae_title" in error_of({"destinations": [dest]})


def test_ae_title_padding_is_stripped() -> None:
    assert parse_config({"node": {"ae_title": "NODE  "}}).node.ae_title == "NODE"


def test_bad_regex_names_the_route_key() -> None:
    text = error_of(
        {"routes": [{"name": "r", "model": "m", "match": {"SeriesDescription": "re:("}}]}
    )
    assert text.startswith(
        "config error: routes.0.match: SeriesDescription: bad regular expression"
    )


def test_priorities_by_name_or_number_and_bad_ones_named() -> None:
    cfg = parse_config({"routes": [{"name": "a", "model": "m", "priority": "stat"},
                                   {"name": "b", "model": "m", "priority": 150},
                                   {"name": "c", "model": "m"}]})  # fmt: skip
    assert [priority_value(r.priority) for r in cfg.routes] == [300, 150, 100]
    assert cfg.priority.attributes["RequestedProcedurePriority"]["STAT"] == "stat"
    text = error_of({"routes": [{"name": "a", "model": "m", "priority": "asap"}]})
    assert text.startswith("config error: routes.0.priority")
    assert "must be within" in error_of({"routes": [{"name": "a", "model": "m", "priority": 5000}]})
    text = error_of({"priority": {"attributes": {"RequestedPriority": {"STAT": "stat"}}}})
    assert "unknown DICOM keyword 'RequestedPriority'" in text


def test_retention_watermarks_in_order() -> None:
    text = error_of({"retention": {"high_watermark_percent": 70, "low_watermark_percent": 80}})
    assert "low_watermark_percent must be <= high_watermark_percent" in text
    assert parse_config({}).retention.enabled is False  # removing images is opt-in


def test_route_to_unknown_destination() -> None:
    text = error_of(
        {
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
            "routes": [{"name": "r", "model": "m", "send_to": ["pacs", "archive"]}],
        }
    )
    assert "routes[0].send_to: unknown destination 'archive' (known: pacs)" in text


def test_duplicate_destination_names() -> None:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}
    assert "names must be unique" in error_of({"destinations": [dest, dest]})


def test_match_accepts_numbers_lists_and_scalars() -> None:
    route = RouteConfig.model_validate(
        {"name": "r", "model": "m", "match": {"Rows": [512, 1024], "Modality": "CT", "X": 3}}
    )
    assert route.match == {"Rows": [512, 1024], "Modality": "CT", "X": 3}


def test_config_is_immutable() -> None:
    cfg = NodeConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.node.port = 1


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config error: file not found: "):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match=r"invalid TOML") as exc:
        load_config(bad)
    assert "\n" not in str(exc.value)


def test_load_config_none_gives_defaults() -> None:
    assert load_config(None).node.port == 11112


# -- the example file ------------------------------------------------------------------


def test_example_file_loads_with_the_documented_routes() -> None:
    cfg = load_config(EXAMPLE)
    routes = {r.name: r for r in cfg.routes}
    assert [r.model for r in cfg.routes] == ["cxr-nodule", "ct-lesion"]
    assert routes["chest-radiographs"].match["Modality"] == ["DX", "CR"]
    assert routes["ct"].match["Modality"] == ["CT"]
    assert all(r.send_to == [] for r in cfg.routes)  # results stay in the outbox
    Router(cfg.routes)  # the rules compile against the DICOM dictionary


def test_example_file_values_are_the_defaults() -> None:
    """The example shows each key with its default, so it doubles as a reference."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    example, defaults = parse_config(data), NodeConfig()
    for section in ("node", "study", "security", "inference", "results", "http", "send"):
        got = getattr(example, section).model_dump()
        want = getattr(defaults, section).model_dump()
        if section == "node":  # data_dir is resolved against the current directory
            got.pop("data_dir")
            want.pop("data_dir")
        assert got == want, section


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        ann = field.annotation
        for sub in getattr(ann, "__args__", (ann,)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += _fields(sub, f"{prefix}{name}.")
    return out


def _last(key: str) -> str:
    return re.escape(key.rsplit(".", 1)[-1])


def test_example_file_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [
        key
        for key in _fields(NodeConfig)
        if not re.search(rf"^[# ]*({_last(key)} = |\[\S*\b{_last(key)}\])", text, re.M)
        and key.count(".") > 0
    ]
    assert missing == []


def test_configuration_doc_mentions_every_key() -> None:
    doc = (EXAMPLE.parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    forms = ("`{}`", "`[{}]`", "`[[{}]]`")
    missing = [
        k
        for k in _fields(NodeConfig)
        if not any(f.format(k.rsplit(".", 1)[-1]) in doc for f in forms)
    ]
    assert missing == []


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("config error: "), text
    return text


def test_a_non_utf8_file_and_a_directory_give_one_line(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[node]\nae_title = "GRÜN"\n'.encode("latin-1"))
    assert "not UTF-8" in _load_error(latin1)
    assert "is a directory" in _load_error(tmp_path)


def test_missing_tls_files_are_refused_at_load(tmp_path: Path) -> None:
    text = error_of(
        {"security": {"tls": {"cert": str(tmp_path / "no.crt"), "key": str(tmp_path / "no.key")}}}
    )
    assert "security.tls: cert file not found" in text


def test_a_bad_destination_calling_ae_title_is_refused() -> None:
    dest = {"name": "p", "ae_title": "PACS", "host": "h", "port": 104}
    text = error_of({"destinations": [{**dest, "calling_ae_title": "WAY-TOO-LONG-AE-TITLE"}]})
    assert text.startswith("config error: destinations.0.calling_ae_title")


def test_config_mistakes_reach_the_user_as_one_line_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[node]\nae_title = "\xff\xfe"\n')
    for path in (bad, tmp_path):
        out = subprocess.run(
            [sys.executable, "-m", "node.ops.cli", "receive", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) == 1, out.stderr


def test_sources_default_to_c_move_to_our_own_ae() -> None:
    cfg = parse_config(
        {"sources": [{"name": "pacs", "ae_title": "ORTHANC ", "host": "10.0.0.5", "port": 4242}]}
    )
    src = cfg.source("pacs")
    assert (src.ae_title, src.retrieve, src.move_destination) == ("ORTHANC", "move", None)
    with pytest.raises(KeyError):
        cfg.source("ris")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"name": "p", "host": "h", "port": 104}, r"sources\.0\.ae_title: Field required"),
        ({"name": "p", "ae_title": "P", "host": "h", "port": 0}, r"sources\.0\.port: "),
        (
            {"name": "p", "ae_title": "P", "host": "h", "port": 104, "retrieve": "push"},
            r"sources\.0\.retrieve: Input should be 'move' or 'get'",
        ),
        (
            {"name": "p", "ae_title": "P", "host": "h", "port": 104, "calling_ae_title": "A\\B"},
            r"sources\.0\.calling_ae_title: AE title",
        ),
        (
            {"name": "p", "ae_title": "P", "host": "h", "port": 104, "tls": {"cert": "c"}},
            r"sources\.0\.tls\.key: Field required",
        ),
        ({"name": "p", "ae_title": "P", "host": "h", "port": 1, "aet": "X"}, r"aet: unknown key"),
    ],
)
def test_source_errors_are_one_line(source: dict[str, Any], expected: str) -> None:
    assert re.search(expected, error_of({"sources": [source]}))


def test_duplicate_source_names() -> None:
    src = {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}
    assert "sources: names must be unique" in error_of({"sources": [src, src]})
