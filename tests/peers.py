"""Real peers for integration tests: dcmtk storescp/storescu, Orthanc, ``airnode serve``.

Every peer listens on 127.0.0.1 only, is started by a context manager and stopped in
``finally`` (SIGTERM, then SIGKILL after a timeout); a peer that does not come up
within its timeout fails the test.  Also here: model packages for tests (manifest-only
ones for the ``fake`` backend, tiny exported ONNX nets, or the shipped demo packages).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PACKAGES = REPO / "models" / "packages"
DEMO_MODELS = ("cxr-nodule", "ct-lesion")

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
LESION = {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung structure"}
MM3 = {"value": "mm3", "scheme": "UCUM", "meaning": "cubic millimeter"}


# ----------------------------------------------------------------------- processes


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something listens on 127.0.0.1:``port``; fails early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float = 5.0, *, group: bool = False
) -> int:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``; returns the exit code.

    ``group``: the SIGKILL goes to the process group (a process started with
    ``start_new_session=True`` and its children).
    """
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        return proc.wait(timeout=5)


@contextmanager
def running(
    cmd: Sequence[str],
    log_path: Path,
    *,
    ready_port: int,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` as a subprocess (own session, output to ``log_path``), yielded once
    ``ready_port`` listens; whatever still runs at the end is stopped here."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
        try:
            try:
                wait_port(ready_port, timeout, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}: see {log_path}") from None
            yield proc
        finally:
            stop_process(proc, 20.0, group=True)


@contextmanager
def logging_process(cmd: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """``cmd`` with its stderr (its log) piped as text; killed at the end if still up.

    The test stops it with :func:`stop_and_read` to check its exit code and log.
    """
    proc = subprocess.Popen(list(cmd), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def stop_and_read(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """SIGTERM ``proc``, wait for it to exit, and return its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return err


# Kept under its old name for the sender tests.
_stop = stop_process


@contextmanager
def storescp(
    port: int, out_dir: Path, *flags: str, aet: str = "STORESCP", accept_all: bool = True
) -> Iterator[Path]:
    """dcmtk storescp; ``+uf`` names files uniquely, so a duplicate is a second file.

    ``accept_all=False`` leaves storescp at its default: uncompressed syntaxes only.
    """
    exe = require_tool("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    syntaxes = ["+xa"] if accept_all else []
    proc = subprocess.Popen(
        [exe, "-aet", aet, "-od", str(out_dir), "+uf", *syntaxes, *flags, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield out_dir
    finally:
        stop_process(proc)


def received(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    aet: str = "SCANNER",
    called: str = "AIRNODE",
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu, the scanner: sends ``files`` in one association.

    ``TCP_NODELAY=1`` switches off Nagle's algorithm in dcmtk, which otherwise adds a
    delayed-ACK stall (tens of ms) to every small PDU on loopback.
    """
    exe = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [exe, "-aet", aet, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@contextmanager
def orthanc(
    tmp: Path,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, tuple[str, str, int]] | None = None,
    *,
    aet: str = "ORTHANC",
    dicomweb: bool = False,
) -> Iterator[str]:
    """Orthanc with a generated configuration; yields its REST base URL.

    ``modalities`` maps a name to ``(AE title, host, port)`` (Orthanc's
    ``DicomModalities``), e.g. the node under test so Orthanc can route to it.
    ``dicomweb`` loads the DICOMweb plugin (Debian package ``orthanc-dicomweb``):
    its root is ``<base URL>/dicom-web``.
    """
    exe = require_tool("Orthanc")
    plugins = [dicomweb_plugin()] if dicomweb else []
    tmp.mkdir(parents=True, exist_ok=True)
    mods = modalities if modalities is not None else {"airnode": ("AIRNODE", "127.0.0.1", 104)}
    config = {
        "Name": "airnode-test",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "storage"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {k: list(v) for k, v in mods.items()},
        "Plugins": plugins,
        "StableAge": 1,
    }
    if dicomweb:
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Ssl": False}
    cfg_path = tmp / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: see {tmp / 'orthanc.log'}")
            time.sleep(0.1)
        wait_port(dicom_port)
        yield base
    finally:
        stop_process(proc)
        log.close()


def dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin; a missing one is a set-up error, not a skip."""
    for d in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc"):
        hits = sorted(Path(d).glob("libOrthancDicomWeb.so*"))
        if hits:
            return str(hits[0])
    pytest.fail("orthanc-dicomweb is not installed: run `bash scripts/install.sh`")


# ------------------------------------------------------------------ airnode serve


def toml_value(value: Any) -> str:
    """A small TOML writer for node configs in tests (str, bool, numbers, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (sections → keys; lists of tables for ``destinations``/``routes``)."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@contextmanager
def airnode_serve(
    config: Path, log_path: Path, *, ready_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """``airnode serve --config FILE`` as a subprocess, ready once its DICOM port listens.

    The test may stop it itself (and check the exit code); whatever is still running
    at the end is stopped here.
    """
    script = Path(sys.executable).with_name("airnode")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "node.ops.cli"]
    with running([*cmd, "serve", "--config", str(config)], log_path, ready_port=ready_port) as p:
        yield p


# ------------------------------------------------------------------- model packages


def _manifest(
    name: str,
    task: str,
    arch: str,
    size: int,
    window: tuple[float, float],
    version: str = "0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    cls = task == "classification"
    label: dict[str, Any] = {
        "name": "nodule" if cls else "lesion",
        "code": NODULE if cls else LESION,
        "threshold": extra.pop("threshold", 0.5),
    }
    if cls:
        label["finding_site"] = LUNG
    else:
        label["units"] = MM3
    return {
        "model": {
            "name": name,
            "version": version,
            "device_uid": "2.25.1234567890" + ("1" if cls else "2"),
            "task": task,
            "arch": arch,
            "arch_kwargs": extra.pop("arch_kwargs", {}),
        },
        "input": {
            "modalities": ["DX", "CR"] if cls else ["CT"],
            "size": [size, size],
            "window_center": window[0],
            "window_width": window[1],
            "use_dataset_window": False,
        },
        "output": {"activation": "sigmoid" if cls else "softmax", "labels": [label]},
    }


def fake_packages(root: Path, size: int = 64, version: str = "0.0.1") -> Path:
    """Manifest-only ``cxr-nodule`` and ``ct-lesion`` packages for the ``fake`` backend."""
    from models.package import write_manifest

    for name, task, arch, window in (
        ("cxr-nodule", "classification", "resnet18", (2048.0, 4096.0)),
        ("ct-lesion", "segmentation", "unet2d", (40.0, 400.0)),
    ):
        pkg = root / name
        write_manifest(pkg, _manifest(name, task, arch, size, window, version))
        (pkg / "model.onnx").write_bytes(b"not read by the fake backend")
    return root


def tiny_onnx_packages(root: Path) -> Path:
    """Untrained, tiny nets exported as real ONNX packages (``onnxruntime`` backend).

    Their outputs mean nothing, so they are made to always report: the classifier's
    threshold is 0 (a heatmap for every image) and the segmenter's last bias favours
    the lesion class (a non-empty mask, hence a SEG).
    """
    import torch

    from models.export import export_package
    from models.nets import build_net

    torch.manual_seed(0)
    cls = build_net("resnet18", num_classes=1, base_width=4)
    export_package(
        cls,
        root / "cxr-nodule",
        _manifest(
            "cxr-nodule",
            "classification",
            "resnet18",
            128,
            (2048.0, 4096.0),
            threshold=0.0,
            arch_kwargs={"base_width": 4},
        ),
    )
    seg = build_net("unet2d", num_classes=2, base_channels=4, depth=2)
    last = [m for m in seg.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        assert last.bias is not None
        last.bias.copy_(torch.tensor([-5.0, 5.0]))
    export_package(
        seg,
        root / "ct-lesion",
        _manifest(
            "ct-lesion",
            "segmentation",
            "unet2d",
            64,
            (40.0, 400.0),
            arch_kwargs={"base_channels": 4, "depth": 2},
        ),
    )
    return root


def shipped_packages_present() -> bool:
    """Whether the repository's trained demo packages are there (with their ONNX file)."""
    return all(
        (SHIPPED_PACKAGES / m / "manifest.toml").is_file()
        and (SHIPPED_PACKAGES / m / "model.onnx").is_file()
        for m in DEMO_MODELS
    )


# ------------------------------------------------------------------ test PKI
def openssl(*args: str) -> None:
    """Run the openssl command line (test PKI only)."""
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A throwaway self-signed CA: (key, certificate)."""
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", str(key), "-out", str(crt))  # fmt: skip
    return key, crt


def make_leaf(d: Path, name: str, ca_key: Path, ca_crt: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by the CA: (key, certificate)."""
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr))  # fmt: skip
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return key, crt
