"""Time to result through ``airnode serve``: last image acknowledged → last result acknowledged.

The node runs as ``airnode serve`` (all stages, ONNX Runtime on the CPU) between dcmtk
``storescu`` (the scanner) and dcmtk ``storescp`` (the PACS, on loopback).  For each
study the figures come from the node's own job table, so every clock is the same
wall clock:

- *last image acknowledged*: the newest ``instances.received_at`` of the study (the
  receiver commits that row just before it answers 0x0000);
- *stable wait*: until the scheduler created the infer job (``stable_after_s`` plus
  its poll interval); excluded from the time to result and reported on its own;
- *time to result*: infer job created → last ``send`` job of the study done (the
  sender marks it done when the PACS has answered the C-STORE with success);
- the breakdown: ``queue`` (job created → claimed by the worker), the worker's
  ``payload["timings"]`` (``load``: reading the instances from the spool,
  ``preprocess``, ``inference``, ``postprocess``, ``encode``, ``store``), and ``send``
  (infer job done → last result acknowledged).

Both models are loaded by warm-up studies first (their load time is printed
separately), as in a node that has been running.  Run::

    .venv/bin/python bench/e2e.py [--ct-slices 300] [--ct-size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.ops.demo import demo_studies  # noqa: E402
from node.ops.synthetic import write_series  # noqa: E402
from node.store.db import Database, Instance, Job, JobKind, JobStatus  # noqa: E402
from tests.peers import running  # noqa: E402

PHASES = ("queue", "load", "preprocess", "inference", "postprocess", "encode", "store", "send")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data_dir: Path, packages: Path, port: int, pacs: int) -> None:
    path.write_text(
        f"""[node]
port = {port}
data_dir = "{data_dir}"
log_level = "WARNING"

[study]
stable_after_s = 1.0

[inference]
backend = "onnxruntime"
model_dirs = ["{packages}"]

[http]
enabled = false

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs}

[[routes]]
name = "cxr"
model = "cxr-nodule"
match = {{ Modality = ["DX", "CR"] }}
send_to = ["pacs"]

[[routes]]
name = "ct"
model = "ct-lesion"
match = {{ Modality = ["CT"] }}
send_to = ["pacs"]
""",
        encoding="utf-8",
    )


def storescu(port: int, files: list[Path]) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    exe = shutil.which("storescu") or "storescu"
    proc = subprocess.run(
        [exe, "-aet", "SCANNER", "-aec", "AIRNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed: {proc.stderr.strip()}")


def measure(db: Database, study_uid: str, timeout: float) -> dict[str, Any]:
    """Wait until every send job of the study is done; return its figures (seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with db.read() as s:
            infer = s.scalars(
                select(Job).where(Job.kind == JobKind.INFER, Job.study_instance_uid == study_uid)
            ).all()
            sends = s.scalars(
                select(Job).where(Job.kind == JobKind.SEND, Job.study_instance_uid == study_uid)
            ).all()
            received = [
                float(t)
                for t in s.scalars(
                    select(Instance.received_at).where(Instance.study_instance_uid == study_uid)
                )
            ]
        bad = [j for j in [*infer, *sends] if j.status == JobStatus.DEAD]
        if bad:
            raise SystemExit(f"job {bad[0].id} dead: {bad[0].last_error}")
        if (
            infer
            and all(j.status == JobStatus.DONE for j in infer)
            and sends
            and all(j.status == JobStatus.DONE for j in sends)
        ):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"study not finished after {timeout} s")
        time.sleep(0.1)
    (job,) = infer
    t = job.payload["timings"]
    last_image = max(received)
    finished = float(job.finished_at or 0.0)
    last_ack = max(float(j.finished_at or 0.0) for j in sends)
    started = finished - float(t["total"])
    return {
        "model": job.payload["model"],
        "images": len(received),
        "results": len(sends),
        "stable_wait": job.created_at - last_image,
        "time_to_result": last_ack - job.created_at,
        "with_stable_wait": last_ack - last_image,
        "queue": max(0.0, started - job.created_at),
        "load_model": float(t.get("load_model", 0.0)),
        **{k: float(t[k]) for k in ("load", "preprocess", "inference", "postprocess")},
        "encode": float(t["encode"]),
        "store": float(t["store"]),
        "send": last_ack - finished,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    import highdicom
    import numpy
    import onnxruntime
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(
        [shutil.which("storescu") or "storescu", "--version"], capture_output=True, text=True
    ).stdout.splitlines()
    return {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "highdicom": highdicom.__version__,
        "dcmtk": next(
            (ln.strip(" $").removeprefix("dcmtk: ") for ln in dcmtk if "dcmtk" in ln.lower()), "?"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", type=Path, default=REPO / "models" / "packages")
    ap.add_argument("--dx-size", type=int, default=2048, help="DX image rows = columns")
    ap.add_argument("--ct-slices", type=int, default=300)
    ap.add_argument("--ct-size", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if not all(
        (args.packages / m / "manifest.toml").is_file() for m in ("cxr-nodule", "ct-lesion")
    ):
        raise SystemExit(f"no cxr-nodule and ct-lesion packages in {args.packages}")

    tmp = Path(tempfile.mkdtemp(prefix="airnode-e2e-"))
    node_port, pacs_port = free_port(), free_port()
    cfg = tmp / "airnode.toml"
    write_config(cfg, tmp / "data", args.packages.resolve(), node_port, pacs_port)
    print("generating studies ...", flush=True)
    studies: dict[str, list[Path]] = {}
    uids: dict[str, str] = {}
    plan = [
        ("warm-up DX", dict(dx=1, ct=0, seed=100, dx_size=512)),
        # 192 px over the demo's 35 cm field: 1.8 mm pixels, inside ct-lesion's input guard.
        ("warm-up CT", dict(dx=0, ct=1, seed=101, slices=8, ct_size=192)),
        (
            f"DX 1 image {args.dx_size}x{args.dx_size}",
            dict(dx=1, ct=0, seed=1, dx_size=args.dx_size),
        ),
        (
            f"CT {args.ct_slices} slices {args.ct_size}x{args.ct_size}",
            dict(dx=0, ct=1, seed=2, slices=args.ct_slices, ct_size=args.ct_size),
        ),
    ]
    for name, kw in plan:
        ((_, _, series),) = list(demo_studies(**kw))
        studies[name] = write_series(series, tmp / "in" / str(len(studies)))
        uids[name] = str(series[0].StudyInstanceUID)

    airnode = Path(sys.executable).with_name("airnode")
    storescp = shutil.which("storescp") or "storescp"
    (tmp / "pacs").mkdir()
    rows: dict[str, dict[str, Any]] = {}
    with (
        running(
            [storescp, "-aet", "PACS", "-od", str(tmp / "pacs"), "+uf", "+xa", str(pacs_port)],
            tmp / "storescp.log",
            ready_port=pacs_port,
            timeout=90,
        ),
        running(
            [str(airnode), "serve", "--config", str(cfg)],
            tmp / "airnode.log",
            ready_port=node_port,
            timeout=90,
        ),
    ):
        db = Database(f"sqlite:///{tmp / 'data' / 'airnode.sqlite'}")
        for name, files in studies.items():
            print(f"{name}: sending {len(files)} image(s) ...", flush=True)
            storescu(node_port, files)
            rows[name] = measure(db, uids[name], timeout=900)
            r = rows[name]
            print(
                f"  time to result {r['time_to_result']:.2f} s "
                f"(+ stable wait {r['stable_wait']:.2f} s), "
                f"model load {r['load_model']:.2f} s",
                flush=True,
            )
        db.dispose()

    vers = versions()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "pacs": "dcmtk storescp on 127.0.0.1",
        "packages": str(args.packages),
        "versions": vers,
        "studies": rows,
    }
    print()
    print(f"{report['date']}, {report['cpu']} ({report['cores']} cores), {report['pacs']}")
    print(", ".join(f"{k} {v}" for k, v in vers.items()))
    head = ["study", "results", "stable wait", "time to result", *PHASES]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        if name.startswith("warm-up"):
            continue
        cells = [
            name,
            str(r["results"]),
            f"{r['stable_wait']:.2f}",
            f"**{r['time_to_result']:.2f}**",
            *(f"{r[p]:.2f}" for p in PHASES),
        ]
        print("| " + " | ".join(cells) + " |")
    warm = [
        f"{r['model']} {r['load_model']:.2f} s" for n, r in rows.items() if n.startswith("warm")
    ]
    print("model load (paid once per worker process, in the warm-up): " + ", ".join(warm))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
