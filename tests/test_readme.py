"""The README's set-up commands, run as a newcomer would: in a clean clone, new venv.

The test command itself is what CI runs (``.ci/run`` calls it), so here only its text
is checked; the install-and-start command is run for real: it must install into a new
virtual environment, start the node on the embedded defaults, answer C-ECHO, serve
``/health`` and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from node.dimse import echo
from tests.conftest import require_tool
from tests.peers import wait_port

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _setup_commands() -> list[str]:
    section = README.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_names_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    install, test = _setup_commands()
    assert install == (
        "bash scripts/install.sh && .venv/bin/airnode serve --config config/airnode.example.toml"
    )
    assert test == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_install_and_serve_command_works_in_a_clean_clone(tmp_path: Path) -> None:
    git = require_tool("git")
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "airnode"
    subprocess.run([git, "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # The packages it installs come from the developer's or CI's index, as in the README.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    install, _ = _setup_commands()
    log = (tmp_path / "setup.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", install],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(11112, timeout=600)
        assert echo("127.0.0.1", 11112, ae_title="AIRNODE", timeout=10) == 0
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert (clone / ".venv" / "bin" / "airnode").exists()
        assert (clone / "data" / "airnode.sqlite").exists()
        serve = _serve_pid(proc.pid)
        os.kill(serve, signal.SIGTERM)  # what Ctrl-C or systemd would do
        assert proc.wait(timeout=60) == 0, (tmp_path / "setup.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(clone, ignore_errors=True)


def _serve_pid(shell_pid: int) -> int:
    """The ``airnode serve`` process: the shell itself once it has exec'd the last
    command of the ``&&`` list (bash does), else the shell's direct child."""

    def is_serve(pid: int | str) -> bool:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return any(arg.endswith(b"airnode") for arg in cmdline) and b"serve" in cmdline

    if is_serve(shell_pid):
        return shell_pid
    children = Path(f"/proc/{shell_pid}/task/{shell_pid}/children").read_text().split()
    for pid in children:
        if is_serve(pid):
            return int(pid)
    raise AssertionError(f"no airnode serve among the shell's children {children}")
