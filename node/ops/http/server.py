"""The HTTP stage: a small threaded stdlib server for health, metrics, the status page
and STOW-RS.

The standard library's ``ThreadingHTTPServer`` is enough for a loopback endpoint that
a Prometheus server scrapes every few seconds and a person opens now and then, and it
adds no dependency.  GET and HEAD only read; the one write is STOW-RS, which stores
through the receive stage's spool with the C-STORE acknowledgement contract
(:mod:`node.ops.http.stow`).

Routes: ``/health`` (JSON, 200/503), ``/metrics`` (Prometheus text format), ``/``
(status page), ``/preview/<result id>.png`` (heatmap SC preview), ``POST
/dicomweb/studies[/{study}]`` (STOW-RS, PS3.18 §10.5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from node.config import NodeConfig
from node.ops.http.health import health
from node.ops.http.metrics import JobTableCollector, render_metrics
from node.ops.http.page import PAGE_CSP, render_status_page
from node.ops.http.preview import PreviewError, result_preview
from node.ops.http.stow import StowError, StowService, clear_temp
from node.ops.supervisor import read_stage_status, stage_status_path
from node.receive.headers import check_uid
from node.receive.spool import Spool
from node.runtime import start_stage
from node.store.db import Database

__all__ = ["NodeHttpServer", "make_server", "run"]

log = logging.getLogger("airnode.http")

_PREVIEW_RE = re.compile(r"^/preview/(\d{1,18})\.png$")
_STOW_RE = re.compile(r"^/dicomweb/studies(?:/([^/]+))?/?$")


class NodeHttpServer(ThreadingHTTPServer):
    """The server plus what its handlers need: the database and the node's paths."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        db: Database,
        *,
        data_dir: Path,
        outbox_dir: Path,
        min_free_bytes: int,
        stage_status: Callable[[], dict[str, Any] | None],
        node_name: str = "airnode",
        stow: StowService | None = None,
    ) -> None:
        self.db = db
        self.stow = stow
        self.data_dir = data_dir
        self.outbox_dir = outbox_dir
        self.min_free_bytes = min_free_bytes
        self.stage_status = stage_status
        self.node_name = node_name
        self.collector = JobTableCollector(db, data_dir=data_dir, stage_status=stage_status)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: NodeHttpServer
    server_version = "airnode"
    sys_version = ""
    #: Socket timeout: a client that stops sending (a STOW-RS upload cut short) frees
    #: its thread and its temp files instead of holding them forever.
    timeout = 60.0

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        srv = self.server
        try:
            if path == "/health":
                code, body = health(srv.db, srv.data_dir, srv.min_free_bytes, srv.stage_status)
                self._send(code, json.dumps(body).encode(), "application/json")
            elif path == "/metrics":
                self._send(200, render_metrics(srv.collector), CONTENT_TYPE_LATEST)
            elif path in ("/", "/index.html"):
                page = render_status_page(srv.db, node_name=srv.node_name)
                self._send(
                    200,
                    page.encode("utf-8"),
                    "text/html; charset=utf-8",
                    {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"},
                )
            elif m := _PREVIEW_RE.match(path):
                try:
                    png = result_preview(srv.db, srv.outbox_dir, int(m.group(1)))
                except PreviewError as exc:
                    self._text(404, str(exc))
                    return
                self._send(200, png, "image/png")
            else:
                self._text(404, "not found")
        except BrokenPipeError:
            pass
        except Exception:
            log.exception("error serving %s", path)
            self._text(500, "internal error (see the node's log)")

    def _no_write(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_DELETE = do_PATCH = _no_write

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        m = _STOW_RE.match(path)
        stow = self.server.stow
        if m is None or stow is None:
            self._no_write()
            return
        self.close_connection = True  # the body may be left unread on a refusal
        study = m.group(1)
        try:
            if study is not None and check_uid(study):
                raise StowError(400, "the study in the URL is not a valid UID")
            headers = {k.lower(): v for k, v in self.headers.items()}
            result = stow.handle(headers, self.rfile, study_uid=study, peer=self.client_address[0])
        except StowError as exc:
            log.warning("STOW-RS refused with %d: %s", exc.status, exc.message)
            self._text(exc.status, exc.message)
            return
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception:
            log.exception("error serving STOW-RS")
            self._text(500, "internal error (see the node's log)")
            return
        log.info(
            "STOW-RS: %d stored, %d failed → %d",
            len(result.stored),
            len(result.failed),
            result.status,
        )
        extra = {"Retry-After": "30"} if result.status == 503 else None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send(
                result.status, json.dumps(result.json()).encode(), "application/dicom+json", extra
            )


def make_server(cfg: NodeConfig, db: Database | None = None) -> NodeHttpServer:
    """A bound (not yet serving) server for ``cfg``; raises ``OSError`` if the port is taken."""
    database = db if db is not None else Database(cfg.node.resolved_database_url)
    status_file = stage_status_path(cfg)
    stow = None
    if cfg.http.stow:
        spool = Spool(
            cfg.node.spool_dir,
            database,
            min_free_bytes=cfg.security.min_free_bytes,
            max_instance_bytes=cfg.security.max_instance_bytes,
        )
        stow = StowService(spool, max_request_bytes=cfg.http.stow_max_request_bytes)
    return NodeHttpServer(
        (cfg.http.host, cfg.http.port),
        database,
        data_dir=cfg.node.data_dir,
        outbox_dir=cfg.node.outbox_dir,
        min_free_bytes=cfg.security.min_free_bytes,
        stage_status=lambda: read_stage_status(status_file),
        node_name=cfg.node.ae_title,
        stow=stow,
    )


def run(cfg: NodeConfig, replica: int = 0) -> None:
    """Entry point of the ``http`` stage: serve until SIGTERM or Ctrl-C."""
    stage = start_stage(cfg, "http", replica)
    db = stage.open_db()
    try:
        server = make_server(cfg, db)
        if server.stow is not None:
            clear_temp(server.stow.spool)  # uploads cut short by a crash were never answered
    except OSError as exc:
        db.dispose()
        log.error(
            "http: cannot listen on %s:%d: %s; set [http] port or enabled = false",
            cfg.http.host,
            cfg.http.port,
            exc.strerror or exc,
        )
        raise SystemExit(2) from None
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    log.info(
        "http: serving /, /health, /metrics%s on http://%s:%d/",
        ", /dicomweb/studies" if server.stow is not None else "",
        cfg.http.host,
        cfg.http.port,
    )
    try:
        while not stage.stopping.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        server.db.dispose()
        log.info("http: stopped")
