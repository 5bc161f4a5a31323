"""Typed node configuration, read from TOML and validated once at start-up.

Every stage receives the :class:`NodeConfig` explicitly; nothing reads the file
again or mutates it at run time.  A bad file raises :class:`ConfigError` whose
message is one line naming the offending key, e.g.
``config error: node.port: Input should be less than or equal to 65535``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ALL_RESULT_OBJECTS",
    "PRIORITY_LEVELS",
    "ConfigError",
    "DestinationConfig",
    "HttpConfig",
    "InferenceConfig",
    "NodeConfig",
    "NodeSection",
    "PriorityConfig",
    "ResultsConfig",
    "RetentionConfig",
    "RouteConfig",
    "SecurityConfig",
    "SourceConfig",
    "StudyConfig",
    "TlsConfig",
    "load_config",
    "priority_name",
    "priority_value",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid (one-line message)."""


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or len(value) > 16:
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return stripped


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Model):
    """DICOM TLS (PS3.15 Annex B, BCP 195): TLS 1.2 or newer."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        # A missing certificate must stop the start, not make the receiver crash-loop.
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{name} file not found: {value}")
        return self


class NodeSection(_Model):
    ae_title: str = "AIRNODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = None
    receiver_processes: int = Field(default=1, ge=1, le=64)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    log_phi: bool = False

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL; defaults to a SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'airnode.sqlite').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"


class StudyConfig(_Model):
    stable_after_s: float = Field(default=60.0, ge=0)
    force_after_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _ceiling(self) -> StudyConfig:
        if self.force_after_s < self.stable_after_s:
            raise ValueError("force_after_s must be >= stable_after_s")
        return self


class SecurityConfig(_Model):
    allowed_calling_aets: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    max_associations_per_host: int = Field(default=8, ge=1)
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)
    #: Maximum PDU length announced to peers (PS3.8 D.1); larger PDUs are refused
    #: before they are buffered.
    max_pdu_bytes: int = Field(default=4 * 1024**2, ge=4096, le=256 * 1024**2)
    #: A PDU must arrive at least this fast (after network_timeout_s of grace).
    min_rate_bytes_per_s: float = Field(default=16 * 1024, gt=0)
    #: How long a C-STORE waits for a locked database before answering 0xA700.
    db_lock_timeout_s: float = Field(default=5.0, gt=0, le=60)
    min_free_bytes: int = Field(default=512 * 1024**2, ge=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    tls: TlsConfig | None = None

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]


#: Result objects a destination can be sent: TID 1500 SR, SEG, heatmap secondary
#: captures, grayscale presentation states.
ResultObject = Literal["sr", "seg", "sc", "pr"]
ALL_RESULT_OBJECTS: tuple[ResultObject, ...] = ("sr", "seg", "sc", "pr")


class DestinationConfig(_Model):
    """Where results go: a DICOM peer (``kind = "dimse"``, C-STORE to ``ae_title`` at
    ``host``:``port``) or a DICOMweb origin server (``kind = "dicomweb"``, STOW-RS,
    PS3.18 §10.5, to ``url``/studies).

    For DICOMweb, ``auth_header_env`` names an environment variable whose value is sent
    as the ``Authorization`` header (e.g. ``Bearer …``): the secret never sits in the
    file.  ``tls`` gives a client certificate (``cert``, ``key``) and the CA that signed
    the server's certificate (``ca``); without it an ``https`` URL is verified against
    the system's CAs.
    """

    name: str = Field(min_length=1, max_length=64)  # the jobs.destination column
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None
    auth_header_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    calling_ae_title: str | None = None
    tls: TlsConfig | None = None
    max_pdu: int = Field(default=0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)
    #: Which result objects this destination gets (a PACS whose viewer shows neither SR
    #: nor SEG may want only "sc" and "pr"); all of them by default.
    objects: list[ResultObject] = Field(
        default_factory=lambda: list(ALL_RESULT_OBJECTS), min_length=1
    )

    _ae = field_validator("ae_title", "calling_ae_title")(
        classmethod(lambda cls, v: None if v is None else _check_ae(v))
    )

    @model_validator(mode="after")
    def _kind(self) -> DestinationConfig:
        if self.kind == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a DICOM destination needs {', '.join(missing)}")
            if self.url or self.auth_header_env:
                raise ValueError('url and auth_header_env need kind = "dicomweb"')
            return self
        if not self.url or not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError("a dicomweb destination needs url = http(s)://host[:port]/path")
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls needs an https:// url")
        if self.host or self.port:
            raise ValueError('host and port are for kind = "dimse"; use url')
        return self

    def dimse_peer(self) -> tuple[str, str, int]:
        """(AE title, host, port) of a DICOM destination."""
        if self.ae_title is None or self.host is None or self.port is None:
            raise ValueError(f"destination {self.name} is not a DICOM (dimse) destination")
        return self.ae_title, self.host, self.port

    @property
    def address(self) -> str:
        """Where it is, for logs and the audit trail: ``AE@host:port`` or the URL."""
        if self.kind == "dicomweb":
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


class SourceConfig(_Model):
    """A PACS or archive the node queries and retrieves from (``airnode fetch``).

    ``retrieve = "move"`` asks the PACS to C-MOVE the instances to our own AE
    (``move_destination``, default ``[node] ae_title``: the PACS must know that AE
    with our host and port); ``"get"`` receives them on the query's own association
    (C-GET, PS3.4 Annex C.4.3), which needs no entry for us in the PACS but is not
    offered by every PACS.
    """

    name: str = Field(min_length=1)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    tls: TlsConfig | None = None
    retrieve: Literal["move", "get"] = "move"
    move_destination: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("ae_title", "calling_ae_title", "move_destination")
    @classmethod
    def _aes(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value)


#: Named job priorities; a higher number is claimed first (``jobs.priority``).
PRIORITY_LEVELS: dict[str, int] = {"research": 0, "routine": 100, "urgent": 200, "stat": 300}
#: A priority as written in the configuration: a level name or an integer.
PriorityValue = Literal["stat", "urgent", "routine", "research"] | int


def priority_value(value: PriorityValue) -> int:
    """The number of a priority: a level of :data:`PRIORITY_LEVELS` or the integer itself."""
    return value if isinstance(value, int) else PRIORITY_LEVELS[value]


def priority_name(number: int) -> str:
    """``stat``, ``urgent``, ``routine``, ``research``, or the number when it is none of them."""
    for name, value in PRIORITY_LEVELS.items():
        if value == number:
            return name
    return str(number)


_PRIORITY_RANGE = (-1000, 1000)


def _check_priority(value: PriorityValue) -> PriorityValue:
    if isinstance(value, int) and not _PRIORITY_RANGE[0] <= value <= _PRIORITY_RANGE[1]:
        raise ValueError(
            f"priority {value} must be within {_PRIORITY_RANGE[0]}..{_PRIORITY_RANGE[1]}"
        )
    return value


#: A ``match`` condition: accepted values (text or numbers) or ``"re:PATTERN"``.
MatchValue = list[str | int | float] | str | int | float


class RouteConfig(_Model):
    """A routing rule.

    ``match`` maps a DICOM keyword (or one of the derived keys ``CallingAETitle``,
    ``ImageSize`` as "ROWSxCOLUMNS") to either a list of accepted values or a string
    of the form ``"re:PATTERN"`` (regular expression, searched case-insensitively).
    All keys must match (AND); several routes may fire for one series.  An OR of
    conditions is written as several routes naming the same model.

    ``model_version`` pins the route to one installed version of ``model``; without
    it the highest installed version runs (see ``models.package.select_package``).
    """

    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    model_version: str | None = Field(default=None, min_length=1, max_length=64)
    match: dict[str, MatchValue] = Field(default_factory=dict)
    send_to: list[str] = Field(default_factory=list)
    #: Priority of the jobs this route creates (``stat``, ``urgent``, ``routine``,
    #: ``research`` or an integer; higher is claimed first); ``[priority]`` may raise it.
    priority: PriorityValue = "routine"

    _prio = field_validator("priority")(classmethod(lambda cls, v: _check_priority(v)))

    @field_validator("match")
    @classmethod
    def _patterns(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        for key, cond in value.items():
            if isinstance(cond, str) and cond.startswith("re:"):
                try:
                    re.compile(cond[3:])
                except re.error as exc:
                    raise ValueError(f"{key}: bad regular expression: {exc}") from exc
        return value


class InferenceConfig(_Model):
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch", "fake"] = "auto"
    model_dirs: list[Path] = Field(default_factory=lambda: [Path("models/packages")])
    workers: int = Field(default=1, ge=1, le=64)
    batch_size: int = Field(default=8, ge=1, le=1024)
    intra_op_threads: int = Field(default=0, ge=0)


class ResultsConfig(_Model):
    heatmap_max_images: int = Field(default=3, ge=0, le=1000)
    manufacturer: str = "airnode"
    institution_name: str | None = None


def _default_priority_attributes() -> dict[str, dict[str, PriorityValue]]:
    # Requested Procedure Priority (0040,1003), PS3.3 C.4.11: STAT, HIGH, ROUTINE,
    # MEDIUM, LOW.  Only the values that raise a routine job are mapped.
    return {"RequestedProcedurePriority": {"STAT": "stat", "HIGH": "urgent"}}


class PriorityConfig(_Model):
    """Header attributes that raise the priority of a study's jobs.

    ``attributes`` maps a DICOM keyword to {value → priority}; the scheduler reads it
    from the header it already reads per series, compares the value as stripped,
    case-insensitive text, and a job runs at the highest of its route's priority and
    every mapped value among its input series.  An attribute never lowers a priority.
    """

    attributes: dict[str, dict[str, PriorityValue]] = Field(
        default_factory=_default_priority_attributes
    )

    @field_validator("attributes")
    @classmethod
    def _levels(
        cls, value: dict[str, dict[str, PriorityValue]]
    ) -> dict[str, dict[str, PriorityValue]]:
        from pydicom.datadict import tag_for_keyword

        for key, mapping in value.items():
            if tag_for_keyword(key) is None:  # a typo would silently never match
                raise ValueError(f"unknown DICOM keyword {key!r}")
            for prio in mapping.values():
                _check_priority(prio)
        return value


class RetentionConfig(_Model):
    """How long finished studies and result files stay on disk (``airnode purge``).

    Nothing of a study with an unfinished job (queued, running or failed awaiting a
    retry) is ever removed.  ``enabled`` turns on the periodic pass in the scheduler;
    ``airnode purge`` runs one pass on demand whatever it says.
    """

    enabled: bool = False
    #: Days a finished study stays in the spool after its last job ended; ``None``: no age limit.
    spool_keep_days: float | None = Field(default=30.0, ge=0)
    #: Days an outbox file whose send jobs are all finished (or that has none) stays.
    outbox_keep_days: float | None = Field(default=30.0, ge=0)
    #: Above this share of the spool's file system in use, finished studies are removed
    #: oldest first, whatever their age, until the use is back at ``low_watermark_percent``.
    high_watermark_percent: float = Field(default=85.0, gt=0, le=100)
    low_watermark_percent: float = Field(default=75.0, gt=0, le=100)
    #: Below this many free bytes the scheduler cleans up at once, on every pass.
    emergency_free_bytes: int = Field(default=2 * 1024**3, ge=0)
    #: Seconds between two periodic passes (the emergency check runs on every pass).
    interval_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> RetentionConfig:
        if self.low_watermark_percent > self.high_watermark_percent:
            raise ValueError("low_watermark_percent must be <= high_watermark_percent")
        return self


class HttpConfig(_Model):
    enabled: bool = True
    #: Loopback by default: the endpoints have no login, so binding to another address
    #: exposes them (STOW-RS included) to whoever can reach it.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    #: STOW-RS (``POST /dicomweb/studies``, PS3.18 §10.5) into the spool.
    stow: bool = True
    #: Largest STOW-RS request body; each part is also bounded by
    #: ``security.max_instance_bytes``.
    stow_max_request_bytes: int = Field(default=8 * 1024**3, ge=1024)


class SendPolicyConfig(_Model):
    max_attempts: int = Field(default=10, ge=1)
    base_delay_s: float = Field(default=2.0, gt=0)
    max_delay_s: float = Field(default=300.0, gt=0)
    lease_s: float = Field(default=120.0, gt=0)


class NodeConfig(_Model):
    node: NodeSection = Field(default_factory=NodeSection)
    study: StudyConfig = Field(default_factory=StudyConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    send: SendPolicyConfig = Field(default_factory=SendPolicyConfig)
    priority: PriorityConfig = Field(default_factory=PriorityConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destinations: names must be unique")
        sources = [src.name for src in self.sources]
        if len(set(sources)) != len(sources):
            raise ValueError("sources: names must be unique")
        for i, route in enumerate(self.routes):
            for dest in route.send_to:
                if dest not in names:
                    raise ValueError(
                        f"routes[{i}].send_to: unknown destination {dest!r} "
                        f"(known: {', '.join(names) or 'none'})"
                    )
        return self

    def destination(self, name: str) -> DestinationConfig:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def source(self, name: str) -> SourceConfig:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> NodeConfig:
    """Validate a decoded TOML mapping; a relative ``data_dir`` resolves against ``base_dir``
    (the current directory when the file is loaded, like any command-line path)."""
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_format_error(exc)}") from None
    if base_dir is not None and not cfg.node.data_dir.is_absolute():
        node = cfg.node.model_copy(update={"data_dir": (base_dir / cfg.node.data_dir).resolve()})
        cfg = cfg.model_copy(update={"node": node})
    return cfg


def load_config(path: Path | str | None) -> NodeConfig:
    """Read and validate a TOML file; ``None`` gives the embedded defaults."""
    if path is None:
        return parse_config({}, base_dir=Path.cwd())
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config error: file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config error: {p} is a directory, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config error: {p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02X} at "
            f"offset {exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {p}: invalid TOML: {exc}") from None
    return parse_config(data, base_dir=Path.cwd())
