#!/usr/bin/env python3
"""Ingest benchmark: images/s and MB/s for a 300-slice CT into three receivers.

    .venv/bin/python bench/ingest.py [--slices 300] [--repeat 2] [--processes 4] [--write]

Receivers, each started fresh on loopback for every run:
- airnode (durable: fsync of file and directory, committed row before 0x0000);
- dcmtk ``storescp`` writing to a temp dir (no fsync; ``--fork`` for parallel
  associations), the raw speed of the DICOM upper layer;
- Orthanc (Debian package, default storage: files plus its SQLite index).

The sender is dcmtk ``storescu``, one process per association, files split
round-robin.  ``TCP_NODELAY=1`` is set for storescu and storescp: without it dcmtk
stalls on Nagle's algorithm.  The time is wall-clock from the first storescu start to
the last exit; a run counts only if every instance got 0x0000.  With ``--write`` the
figures replace the "Ingest" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.ops.synthetic import ct_series, write_series  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.peers import running  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


@contextlib.contextmanager
def airnode(work: Path, processes: int) -> Iterator[tuple[int, str]]:
    port = free_port()
    cfg = work / "airnode.toml"
    cfg.write_text(
        f'[node]\nae_title = "AIRNODE"\nport = {port}\ndata_dir = "{work / "data"}"\n'
        f'receiver_processes = {processes}\nlog_level = "WARNING"\n'
        "[security]\nmax_associations = 64\nmax_associations_per_host = 64\n"
    )
    subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "db", "upgrade", "--config", str(cfg)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with running(
        [sys.executable, "-m", "node.ops.cli", "receive", "--config", str(cfg)],
        work / "airnode.log",
        ready_port=port,
    ):
        time.sleep(0.5 * processes)  # every process listening
        yield port, "AIRNODE"


@contextlib.contextmanager
def storescp(work: Path, processes: int) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    with running(
        ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        work / "storescp.log",
        ready_port=port,
        env=ENV,
    ):
        yield port, "STORESCP"


@contextlib.contextmanager
def orthanc(work: Path, processes: int) -> Iterator[tuple[int, str]]:
    port, http = free_port(), free_port()
    storage = work / "orthanc"
    storage.mkdir()
    cfg = work / "orthanc.json"
    cfg.write_text(
        json.dumps(
            {
                "Name": "bench",
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": http,
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "Plugins": [],
            }
        )
    )
    with running(["/usr/sbin/Orthanc", str(cfg)], work / "orthanc.log", ready_port=port):
        yield port, "ORTHANC"


Receiver = Callable[[Path, int], contextlib.AbstractContextManager[tuple[int, str]]]


def send(port: int, aet: str, files: list[Path], associations: int) -> float:
    """Seconds to store ``files`` over ``associations`` parallel storescu processes."""
    parts = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-v", "-aec", aet, "127.0.0.1", str(port), *map(str, part)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for part in parts
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    elapsed = time.perf_counter() - start
    ok = sum(o.count("Received Store Response (Success)") for o in outs)
    if ok != len(files):
        raise RuntimeError(f"{aet}: only {ok} of {len(files)} instances acknowledged")
    return elapsed


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores visible, Linux {platform.release()}"


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            text = (out.stdout or out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except OSError:
            return "?"

    dcmtk = first_line(["storescp", "--version"])
    m = re.search(r"v?(\d+\.\d+\.\d+)", dcmtk)
    orth = first_line(["/usr/sbin/Orthanc", "--version"])
    return (
        f"Python {platform.python_version()}, pynetdicom {version('pynetdicom')}, "
        f"pydicom {version('pydicom')}, dcmtk {m.group(1) if m else dcmtk}, {orth}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--processes", type=int, nargs="+", default=[2, 4], help="airnode receiver processes"
    )
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "/usr/sbin/Orthanc"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="airnode-bench-") as tmp:
        root = Path(tmp)
        files = write_series(ct_series(args.slices, args.size, args.size), root / "ct")
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        receivers: list[tuple[str, Receiver, int]] = [
            ("airnode, 1 process", airnode, 1),
            *[(f"airnode, {n} processes", airnode, n) for n in args.processes if n > 1],
            ("dcmtk storescp --fork", storescp, 1),
            ("Orthanc", orthanc, 1),
        ]
        results: dict[tuple[str, int], float] = {}
        for assocs in (1, 4):
            for name, recv, procs in receivers:
                if assocs == 1 and procs > 1:
                    continue
                times = []
                for r in range(args.repeat):
                    work = root / f"run-{len(results)}-{r}"
                    work.mkdir()
                    with recv(work, procs) as (port, aet):
                        times.append(send(port, aet, files, assocs))
                    shutil.rmtree(work, ignore_errors=True)
                best = min(times)
                results[(name, assocs)] = best
                print(
                    f"{name:28s} {assocs} assoc: {args.slices / best:7.1f} img/s "
                    f"{total_mb / best:7.1f} MB/s  (runs: {', '.join(f'{t:.2f}s' for t in times)})",
                    flush=True,
                )
    table = render(results, args, total_mb)
    print(table)
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", table)
    return 0


def render(results: dict[tuple[str, int], float], args: argparse.Namespace, mb: float) -> str:
    def rate(name: str, a: int) -> float:
        return float(args.slices) / results[(name, a)]

    lines = [
        "## Ingest",
        "",
        f"`bench/ingest.py` on {time.strftime('%Y-%m-%d')}: {args.slices} CT slices "
        f"{args.size}x{args.size} 16-bit ({mb:.0f} MB), sent by dcmtk `storescu` "
        "(one process per association, `TCP_NODELAY=1`) to receivers on 127.0.0.1; best "
        f"of {args.repeat} runs, each into a fresh empty store.",
        "",
        f"- Machine: {machine()} (shared with other work while measured)",
        f"- Versions: {versions()}",
        "",
        "| receiver | associations | images/s | MB/s | durable ack |",
        "|---|---:|---:|---:|---|",
    ]
    for (name, a), t in results.items():
        durable = {
            "airnode": "yes (fsync file + dir, row committed)",
            "dcmtk": "no (no fsync)",
            "Orthanc": "default storage (files + SQLite index)",
        }[name.split(",")[0].split(" ")[0]]
        lines.append(f"| {name} | {a} | {args.slices / t:.1f} | {mb / t:.1f} | {durable} |")
    scp = "dcmtk storescp --fork"
    one_vs_orthanc = rate("airnode, 1 process", 1) / rate("Orthanc", 1)
    best4 = max(rate(name, 4) for name, a in results if a == 4 and name.startswith("airnode"))
    four_vs_scp = best4 / rate(scp, 4)
    lines += [
        "",
        f"- 1 association: airnode / Orthanc = {one_vs_orthanc:.2f} (target ≥ 1).",
        f"- 4 associations: best airnode / storescp = {four_vs_scp:.2f} (target ≥ 0.6).",
        "",
        "Reading the figures: every airnode instance costs three fsyncs before its "
        "0x0000 (file, directory, SQLite WAL; the WAL one is shared by concurrent "
        "associations through group commit) and roughly 7-10 ms of Python CPU "
        "(pynetdicom's PDU handling and polling threads, header parse, SHA-256, SQL). "
        "storescp only writes to the page cache. On a 2-core machine that also runs "
        "the four storescu senders, more receiver processes than cores oversubscribe "
        "the CPU: here 1 or 2 processes do best (which one varies between runs); with "
        "more cores set `receiver_processes` to about the number of free cores. "
        "Run-to-run variation on this shared machine is large (other test suites "
        "run at the same time), so compare ratios within one run.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the '## Ingest' section, leaving the others untouched."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Ingest\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
