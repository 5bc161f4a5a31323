#!/usr/bin/env python3
"""Ingest benchmark: a CT series and a set of large radiographs into three receivers.

    .venv/bin/python bench/ingest.py [--data ct dx] [--repeat 2] [--processes 2] [--write]
    .venv/bin/python bench/ingest.py --rss 20000      # receiver memory under sustained load

Data: 300 CT slices of 512x512 (0.5 MB each) and 50 DX images of 2048x2048 (8 MB each).
Receivers, each started fresh on loopback for every run:
- airnode (durable: fsync of file and directory, committed row before 0x0000);
- dcmtk ``storescp`` writing to a temp dir (no fsync; ``--fork`` for parallel
  associations), the raw speed of the DICOM upper layer;
- Orthanc (Debian package, default storage: files plus its SQLite index, fsynced).

The sender is dcmtk ``storescu``, one process per association, files split
round-robin.  Every dcmtk and Orthanc process, sender and receiver, runs with
``TCP_NODELAY=1`` in its environment: without it their sockets stall on Nagle's
algorithm and delayed ACKs (about 20 images/s whatever the size), and the bench
refuses to report a peer whose one-association CT rate looks like that.

Per run: wall-clock time from the first storescu start to the last exit (a run counts
only if every instance got 0x0000); the C-STORE latency of every instance (from
"Sending Store Request" to "Received Store Response" in storescu's time-stamped log),
reported as p50/p99; and the receiver's CPU time per instance, from ``/proc`` of every
process of the receiver's session.  With ``--write`` the figures replace the "Ingest"
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.ops.synthetic import ct_series, dx_image, write_series  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.peers import running  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Below this, one association of ~0.5 MB images is Nagle-bound (delayed ACKs, ~40 ms each).
NAGLE_SUSPECT_IMG_S = 30.0
#: storescu log with microsecond time stamps (``%s.%Q`` prints ``seconds.mmm.uuu``).
LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%Q} %m%n
"""
_STAMP = re.compile(r"^(\d+)\.(\d{3})\.(\d{3}) (.*)$")


@dataclass(frozen=True)
class Peer:
    """A receiver under test: where it listens and the process whose session it leads."""

    port: int
    aet: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def airnode(work: Path, processes: int) -> Iterator[Peer]:
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
    ) as proc:
        time.sleep(0.5 * processes)  # every process listening
        yield Peer(port, "AIRNODE", proc)


@contextlib.contextmanager
def storescp(work: Path, processes: int) -> Iterator[Peer]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    with running(
        ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        work / "storescp.log",
        ready_port=port,
        env=ENV,
    ) as proc:
        yield Peer(port, "STORESCP", proc)


@contextlib.contextmanager
def orthanc(work: Path, processes: int) -> Iterator[Peer]:
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
    with running(
        ["/usr/sbin/Orthanc", str(cfg)], work / "orthanc.log", ready_port=port, env=ENV
    ) as proc:
        yield Peer(port, "ORTHANC", proc)


Receiver = Callable[[Path, int], contextlib.AbstractContextManager[Peer]]
_CLK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _session_stats(sid: int) -> tuple[float, int]:
    """CPU seconds (user + system, reaped children included) and RSS bytes of a session.

    Children that already exited and were reaped count through their parent's
    ``cutime``/``cstime``; live ones are listed themselves, so nothing counts twice.
    """
    cpu, rss = 0.0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[3]) != sid:  # field 6 of stat: session id
            continue
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        cpu += (utime + stime + cutime + cstime) / _CLK
        rss += int(fields[21]) * _PAGE
    return cpu, rss


@dataclass
class Run:
    """One timed transfer of the whole data set."""

    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0


def _latencies(log: str) -> list[float]:
    """Per-instance C-STORE latency (request sent → response received) from storescu's log."""
    out: list[float] = []
    sent: float | None = None
    for line in log.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = int(m.group(1)) + int(m.group(2)) / 1e3 + int(m.group(3)) / 1e6
        msg = m.group(4)
        if msg.startswith("Sending Store Request"):
            sent = t
        elif msg.startswith("Received Store Response") and sent is not None:
            out.append((t - sent) * 1e3)
            sent = None
    return out


def send(peer: Peer, files: Sequence[Path], associations: int, work: Path) -> Run:
    """Store ``files`` over ``associations`` parallel storescu processes; time and latency."""
    log_cfg = work / "storescu-log.cfg"
    log_cfg.write_text(LOG_CONFIG)
    parts = [files[i::associations] for i in range(associations)]
    cpu0, _ = _session_stats(peer.proc.pid)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-lc", str(log_cfg), "-aec", peer.aet, "127.0.0.1", str(peer.port)]
            + [str(f) for f in part],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for part in parts
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    elapsed = time.perf_counter() - start
    cpu1, _ = _session_stats(peer.proc.pid)
    ok = sum(o.count("Received Store Response (Success)") for o in outs)
    if ok != len(files):
        raise RuntimeError(f"{peer.aet}: only {ok} of {len(files)} instances acknowledged")
    lat = [x for o in outs for x in _latencies(o)]
    return Run(elapsed, lat, cpu1 - cpu0)


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


@dataclass(frozen=True)
class DataSet:
    name: str
    label: str
    files: list[Path]

    @property
    def mb(self) -> float:
        return sum(f.stat().st_size for f in self.files) / 1e6


def make_data(root: Path, which: Sequence[str], slices: int) -> list[DataSet]:
    out: list[DataSet] = []
    if "ct" in which:
        files = write_series(ct_series(slices, 512, 512), root / "ct")
        out.append(DataSet("CT", f"{slices} × 512² CT", files))
    if "dx" in which:
        dx = [dx_image(rows=2048, cols=2048, seed=i) for i in range(50)]
        out.append(DataSet("DX", "50 × 2048² DX", write_series(dx, root / "dx")))
    return out


Key = tuple[str, str, int]  # data set, receiver, associations

READING = (
    "Reading the figures: every airnode instance costs three fsyncs before its 0x0000 "
    "(file, directory, SQLite WAL; the WAL one is shared by concurrent associations "
    "through group commit), and Python CPU that Orthanc's C++ does not pay. A py-spy "
    "profile of one association (300 CT slices) puts the receiver's wall time in "
    "pynetdicom's two polling reactors (the DUL and association threads each sleep-poll "
    "in 1 ms steps between PDUs), the fsyncs, and SQLAlchemy's session and commit path "
    "(about 10 %); header parsing and hashing are small. Large images (DX) are dominated "
    "by moving bytes, where airnode is level with Orthanc on one association. storescp "
    "only writes to the page cache."
)


def check_not_nagle_bound(results: dict[Key, Run], data: Sequence[DataSet]) -> None:
    """Refuse figures from a peer that stalls on Nagle's algorithm (the bench's own bug)."""
    for d in data:
        if d.mb / len(d.files) > 1.0:
            continue  # large images hide the 40 ms stalls; the CT is the tell
        for (name, recv, assocs), run in results.items():
            if name != d.name or assocs != 1 or recv.startswith("airnode"):
                continue
            rate = len(d.files) / run.seconds
            if rate < NAGLE_SUSPECT_IMG_S:
                raise RuntimeError(
                    f"{recv}: {rate:.1f} img/s on one association of {d.label} looks "
                    "Nagle-bound; is TCP_NODELAY=1 in its environment?"
                )


def ingest(args: argparse.Namespace, root: Path) -> str:
    data = make_data(root, args.data, args.slices)
    receivers: list[tuple[str, Receiver, int]] = [
        ("airnode, 1 process", airnode, 1),
        *[(f"airnode, {n} processes", airnode, n) for n in args.processes if n > 1],
        ("dcmtk storescp --fork", storescp, 1),
        ("Orthanc", orthanc, 1),
    ]
    results: dict[Key, Run] = {}
    for d in data:
        for assocs in (1, 4):
            for name, recv, procs in receivers:
                if assocs == 1 and procs > 1:
                    continue
                runs = []
                for r in range(args.repeat):
                    work = root / f"run-{len(results)}-{r}"
                    work.mkdir()
                    with recv(work, procs) as peer:
                        runs.append(send(peer, d.files, assocs, work))
                    shutil.rmtree(work, ignore_errors=True)
                best = min(runs, key=lambda x: x.seconds)
                results[(d.name, name, assocs)] = best
                print(
                    f"{d.name} {name:24s} {assocs} assoc: {len(d.files) / best.seconds:7.1f} img/s"
                    f"  p50 {_pct(best.latencies_ms, 50):6.1f} ms"
                    f"  cpu {best.cpu_s / len(d.files) * 1e3:6.2f} ms/img"
                    f"  (runs: {', '.join(f'{x.seconds:.2f}s' for x in runs)})",
                    flush=True,
                )
    check_not_nagle_bound(results, data)
    return render(results, args, data)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def render(results: dict[Key, Run], args: argparse.Namespace, data: Sequence[DataSet]) -> str:
    lines = [
        "## Ingest",
        "",
        f"`bench/ingest.py` on {time.strftime('%Y-%m-%d')}: sent by dcmtk `storescu` (one "
        "process per association) to receivers on 127.0.0.1; every dcmtk and Orthanc "
        f"process runs with `TCP_NODELAY=1`; best of {args.repeat} runs, each into a fresh "
        "empty store. Latency: one C-STORE, request sent to response received. CPU: all "
        "processes of the receiver, per instance.",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        "",
        "| data | receiver | assoc. | images/s | MB/s | p50 ms | p99 ms | CPU ms/img "
        "| durable ack |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    durable = {
        "airnode": "yes (fsync file + dir, row committed)",
        "dcmtk": "no (no fsync)",
        "Orthanc": "default storage (files + SQLite index)",
    }
    by_name = {d.name: d for d in data}
    for (dname, name, a), run in results.items():
        d = by_name[dname]
        n = len(d.files)
        lines.append(
            f"| {d.label} | {name} | {a} | {n / run.seconds:.1f} | {d.mb / run.seconds:.1f} "
            f"| {_pct(run.latencies_ms, 50):.1f} | {_pct(run.latencies_ms, 99):.1f} "
            f"| {run.cpu_s / n * 1e3:.2f} | {durable[name.split(',')[0].split(' ')[0]]} |"
        )
    lines.append("")
    for d in data:
        for a in (1, 4):
            ours = max(
                len(d.files) / r.seconds
                for (dn, name, aa), r in results.items()
                if dn == d.name and aa == a and name.startswith("airnode")
            )
            theirs = len(d.files) / results[(d.name, "Orthanc", a)].seconds
            lines.append(
                f"- {d.label}, {a} association{'s' if a > 1 else ''}: best airnode / Orthanc "
                f"= {ours / theirs:.2f} (target ≥ 1.0)."
            )
    if "CT" in by_name:
        ct = results[("CT", "airnode, 1 process", 1)]
        lines.append(
            f"- Receiver CPU per 512² CT instance, 1 association: "
            f"{ct.cpu_s / len(by_name['CT'].files) * 1e3:.2f} ms (target ≤ 3 ms)."
        )
    lines += ["", READING, ""]
    return "\n".join(lines)


def rss_soak(total: int, root: Path, batch: int = 2000) -> str:
    """Receiver RSS after each batch of ``batch`` small instances, up to ``total``."""
    rows: list[tuple[int, int]] = []
    work = root / "soak"
    work.mkdir()
    with airnode(work, 1) as peer:
        sent = 0
        while sent < total:
            n = min(batch, total - sent)
            files = write_series(ct_series(n, 64, 64, seed=1000 + sent), root / f"soak-{sent}")
            send(peer, files, 1, work)
            shutil.rmtree(root / f"soak-{sent}", ignore_errors=True)
            sent += n
            _, rss = _session_stats(peer.proc.pid)
            rows.append((sent, rss))
            print(f"{sent:6d} instances: receiver RSS {rss / 2**20:.1f} MiB", flush=True)
    first = next(r for s, r in rows if s >= min(2000, total))
    last = rows[-1][1]
    lines = [
        "### Receiver memory under sustained load",
        "",
        f"`bench/ingest.py --rss {total}` on {time.strftime('%Y-%m-%d')}: 64x64 CT instances "
        "over one association, airnode with one receiver process; RSS of all its processes.",
        "",
        "| instances | RSS MiB |",
        "|---:|---:|",
        *[f"| {s} | {r / 2**20:.1f} |" for s, r in rows],
        "",
        f"- RSS after {rows[-1][0]} / after 2000: {last / first:.3f} (target ≤ 1.10).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--data", nargs="+", choices=["ct", "dx"], default=["ct", "dx"])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--processes", type=int, nargs="+", default=[2], help="airnode receiver processes"
    )
    ap.add_argument("--rss", type=int, default=0, help="instead: RSS after this many instances")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "/usr/sbin/Orthanc"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="airnode-bench-") as tmp:
        root = Path(tmp)
        if args.rss:
            section, heading = rss_soak(args.rss, root), "### Receiver memory under sustained load"
        else:
            section, heading = ingest(args, root), "## Ingest"
    print(section)
    if args.write:
        write_section(ROOT / "docs" / "benchmarks.md", section, heading)
    return 0


def write_section(path: Path, section: str, heading: str) -> None:
    """Replace (or append) the section under ``heading``, leaving the others untouched."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    level = heading.split(" ")[0]
    stop = "|".join(re.escape(h) + " " for h in ("#" * n for n in range(1, len(level) + 1)))
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^(?:{stop})|\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
