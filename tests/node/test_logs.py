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
