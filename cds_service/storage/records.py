"""What the audit writer stores: one hook call (:class:`AuditRecord`) or one feedback entry
(:class:`FeedbackRecord`), and how a record is encoded in the spool.

Every record carries a ``key`` minted when it is created, stored in a unique column: writing the same
record twice (a replay of the spool after a write whose outcome was unknown) stores it once. The key is
not the call's hookInstance: a refused call may have none, and an EHR that repeats a hookInstance made
two calls, each of which keeps its record.

Spool encoding (zlib level 1 of): a 4-byte little-endian header length, the header (JSON: the kind and
the scalar fields, with each document's length), then the JSON documents as they were handed over
(request, response, ...), byte for byte.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson


def new_key() -> str:
    return uuid.uuid4().hex


@dataclass
class AuditRecord:
    """One hook call. The JSON documents (orders, decisions, response, request) may be given already
    serialised as bytes, which keeps queued records compact."""

    received_at: dt.datetime
    service_id: str
    hook: str | None
    hook_instance: str | None
    issuer: str | None
    patient_id: str | None
    status_code: int
    latency_ms: float
    orders: Any
    decisions: Any
    response: Any
    request: Any
    cards: Sequence[Mapping[str, Any]] = ()
    #: the Da Vinci CRD version the answer followed ("2.0.1", "2.2.1"); None when no answer was made
    crd_version: str | None = None
    #: DTR documentation contexts of the call's conditional decisions (storage/dtr_contexts.py rows)
    dtr_contexts: Sequence[Mapping[str, Any]] = field(default_factory=list)
    key: str = field(default_factory=new_key)

    DOCUMENTS: ClassVar[tuple[str, ...]] = ("orders", "decisions", "response", "request")

    def describe(self) -> dict[str, Any]:
        """What identifies the call in a log line (no PHI beyond ids)."""
        return {"kind": "audit", "hookInstance": self.hook_instance, "service": self.service_id,
                "status": self.status_code, "record_key": self.key}


@dataclass
class FeedbackRecord:
    """One CDS Hooks feedback entry, as received (``entry``: JSON, or its bytes)."""

    received_at: dt.datetime
    service_id: str
    card_uuid: str
    outcome: str
    outcome_timestamp: str
    issuer: str | None
    entry: Any
    key: str = field(default_factory=new_key)

    DOCUMENTS: ClassVar[tuple[str, ...]] = ("entry",)

    def describe(self) -> dict[str, Any]:
        return {"kind": "feedback", "hookInstance": None, "card": self.card_uuid, "service": self.service_id,
                "record_key": self.key}


Record = AuditRecord | FeedbackRecord
_KINDS: dict[str, type[AuditRecord] | type[FeedbackRecord]] = {"audit": AuditRecord, "feedback": FeedbackRecord}
_LENGTH = struct.Struct("<I")
_ABSENT = -1


def _document(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value) if isinstance(value, bytes | bytearray) else orjson.dumps(value)


def encode(record: Record) -> bytes:
    """The record as spool payload bytes (see the module docstring)."""
    kind = "audit" if isinstance(record, AuditRecord) else "feedback"
    header: dict[str, Any] = {"kind": kind}
    documents: list[bytes] = []
    lengths: list[int] = []
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name in record.DOCUMENTS:
            data = _document(value)
            lengths.append(_ABSENT if data is None else len(data))
            if data is not None:
                documents.append(data)
        elif f.name == "cards":
            header["cards"] = [dict(c) for c in value]
        else:
            header[f.name] = value
    header["lengths"] = lengths
    head = orjson.dumps(header)
    return zlib.compress(b"".join([_LENGTH.pack(len(head)), head, *documents]), 1)


def _datetime(value: Any) -> Any:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def decode(payload: bytes) -> Record:
    """The record that :func:`encode` gave these bytes for. Raises ValueError on anything else."""
    try:
        data = zlib.decompress(payload)
        (head_length,) = _LENGTH.unpack_from(data)
        header = orjson.loads(data[4:4 + head_length])
        cls = _KINDS[header.pop("kind")]
        lengths = header.pop("lengths")
        position = 4 + head_length
        for name, length in zip(cls.DOCUMENTS, lengths, strict=True):
            if length == _ABSENT:
                header[name] = None
            else:
                header[name] = data[position:position + length]
                position += length
        header["received_at"] = _datetime(header["received_at"])
        if cls is AuditRecord:
            header["cards"] = [{**c, "created_at": _datetime(c.get("created_at"))} for c in header.get("cards", [])]
        return cls(**header)
    except (zlib.error, struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a spooled record: {type(error).__name__}") from None
