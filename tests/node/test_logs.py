"""Logs carry no PHI by default: names and UIDs are masked, addresses are not."""

from __future__ import annotations

import json
import logging

import pytest

from node.logs import configure_logging, uid_tag

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("json_lines", [False, True])
def test_names_and_uids_are_masked_but_ip_addresses_stay(
    json_lines: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("DEBUG", json_lines=json_lines, stage="test")
    logging.getLogger("x").info("stored %s for Doe^John from 127.0.0.1", UID)
    err = capsys.readouterr().err
    assert "Doe^John" not in err and "Doe" not in err
    assert UID not in err
    assert uid_tag(UID) in err
    assert "127.0.0.1" in err
    if json_lines:
        rec = json.loads(err.strip().splitlines()[-1])
        assert rec["stage"] == "test" and rec["level"] == "INFO"


def test_show_phi_keeps_everything(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", show_phi=True)
    logging.getLogger("x").info("stored %s for Doe^John", UID)
    err = capsys.readouterr().err
    assert UID in err and "Doe^John" in err
    configure_logging("INFO", show_phi=False)
    assert uid_tag(UID).startswith("uid:")


def test_masking_is_linear_on_long_runs_without_caret() -> None:
    """A 60,000-character token (a hostile UID) must not make masking quadratic."""
    import time

    from node.logs import mask_phi

    for text in ("A" * 60_000, "1" * 60_000, "1." * 30_000, "a.b-c'" * 10_000):
        t = time.process_time()
        mask_phi(text)
        mask_phi(text + "^x")
        # Quadratic masking takes minutes here; linear masking a few milliseconds.
        assert time.process_time() - t < 2.0, text[:10]


@pytest.mark.parametrize(
    "uid",
    [
        "2.25.329800735698586629295641978511506172918",  # UUID-derived: three components
        "1.2.840.113619.2",
        "1.3.6.1.4.1.9590.100.1.2.12345",
        "2.25.1234567890123",
    ],
)
def test_every_uid_form_is_masked(uid: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("highdicom").info("copy Study-related attributes from dataset %s", uid)
    err = capsys.readouterr().err
    assert uid not in err and uid_tag(uid) in err


@pytest.mark.parametrize(
    "text", ["from 127.0.0.1", "from 10.20.30.40:104", "took 0.25 s", "v3.0.4"]
)
def test_addresses_numbers_and_versions_stay(text: str) -> None:
    from node.logs import mask_phi

    assert mask_phi(text) == text


def test_one_masking_for_logs_and_status_page() -> None:
    from node.logs import mask_phi
    from node.ops.http.page import scrub

    text = "failed for Doe^John Q in 2.25.329800735698586629295641978511506172918"
    assert scrub(text) == mask_phi(text)
    assert "Doe" not in scrub(text) and "2.25.3298" not in scrub(text)


def test_long_messages_are_truncated_after_masking(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("x").warning("bad UID %s", "1" * 60_000 + "^Doe")
    err = capsys.readouterr().err
    assert len(err) < 10_000 and "Doe" not in err
