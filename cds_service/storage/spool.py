"""The audit spool: records the database could not take yet, on local disk, append-only and fsync'd,
replayed into the database in the order they were written.

One spool directory per replica; every process of the replica (each worker, each writer) shares it.
What it holds:

    000000000001.seg   segments of frames, appended in order; a new segment when the newest is full
    head               where replay continues ("<segment> <offset>"; replaced atomically)
    lock               flock taken for every append, read and move of the head (short)
    replay.lock        flock held by the one process that replays the spool into the database
    drops.json         records refused, counted per reason
    rejected.seg       records the database refused one by one (kept for inspection)
    corrupt-*.bin      bytes that were not a valid frame (a write torn by a crash)

A frame is: magic (8 bytes), payload length (u32), CRC-32 of time and payload (u32), the record's
``received_at`` in microseconds since the epoch (i64), then the payload (:func:`records.encode`).
The spool's files never exceed ``max_bytes`` in all: a record that does not fit is refused, counted
under its reason in ``drops.json`` and logged as one JSON line (timestamp, reason, hookInstance).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from .records import Record, decode, encode

log = logging.getLogger("cds_service.audit")

DEFAULT_MAX_BYTES = 1 << 30
MAGIC = b"\x89CDSaud\n"
_FRAME = struct.Struct("<8sIIq")
_TIME = struct.Struct("<q")
_SEGMENT = re.compile(r"^(\d{12})\.seg$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Why a record was not stored (the label of audit_records_dropped_total{reason}).
SPOOL_FULL = "spool_full"
SPOOL_UNWRITABLE = "spool_unwritable"
REJECTED = "rejected_by_database"
CORRUPT = "corrupt_spool_frame"


def default_spool_dir(database_url: str) -> Path:
    """Beside the SQLite file (``<name>-audit-spool``), else ``cds-service-audit-spool`` in the working
    directory."""
    url = sa.engine.make_url(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).absolute()
        return database.with_name(database.stem + "-audit-spool")
    return Path.cwd() / "cds-service-audit-spool"


def _micros(moment: dt.datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return (aware - _EPOCH) // dt.timedelta(microseconds=1)


def frame(record: Record) -> bytes:
    payload = encode(record)
    stamp = _TIME.pack(_micros(record.received_at))
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(stamp + payload), _micros(record.received_at)) + payload


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass
class Chunk:
    """Records read from the spool, and the position after the last of them."""

    records: list[Record]
    end: Position


@dataclass
class SpoolStatus:
    directory: str
    records: int
    bytes: int
    max_bytes: int
    oldest: dt.datetime | None
    dropped: dict[str, int]
    replaying: bool

    def oldest_age_seconds(self, now: dt.datetime | None = None) -> float | None:
        if self.oldest is None:
            return None
        return round(((now or dt.datetime.now(dt.UTC)) - self.oldest).total_seconds(), 3)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 segment_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(max_bytes // 8, 64 << 20))
        self.dropped: Counter[str] = Counter()  # by this process, per reason
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._replay_fd: int | None = None

    # --- files --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, create: bool) -> Iterator[bool]:
        """Hold the spool lock (across processes and threads); yields False when there is no spool
        directory and ``create`` is False."""
        with self._mutex:
            if not self.directory.is_dir():
                if not create:
                    yield False
                    return
                self.directory.mkdir(parents=True, exist_ok=True)
            if self._lock_fd is None:
                self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _segment(self, number: int) -> Path:
        return self.directory / f"{number:012d}.seg"

    def _segments(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_SEGMENT.match, names) if m)

    def _head(self, segments: Sequence[int]) -> Position:
        """Where replay continues. A segment older than the head (left by a crash between moving the head
        and deleting it) is replayed again: the database ignores records it already has."""
        try:
            number, offset = (int(v) for v in (self.directory / "head").read_text().split())
            head = Position(number, offset)
        except (OSError, ValueError):
            head = Position(segments[0] if segments else 1, 0)
        if segments and segments[0] < head.segment:
            return Position(segments[0], 0)
        if head.segment in segments and head.offset > self._segment(head.segment).stat().st_size:
            return Position(head.segment, 0)
        return head

    def _set_head(self, head: Position) -> None:
        _replace(self.directory / "head", f"{head.segment} {head.offset}\n".encode())

    # --- writing ------------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> list[Record]:
        """Append records durably (fsync'd before returning), in order. Returns those refused: the rest
        of the batch once one does not fit within ``max_bytes``, or all of them when the disk fails.
        Refused records are counted and logged here."""
        if not records:
            return []
        frames = [frame(r) for r in records]
        fitting = 0
        try:
            with self._locked(create=True):
                segments = self._segments()
                sizes = [self._segment(s).stat().st_size for s in segments]
                total = sum(sizes)
                while fitting < len(frames) and total + len(frames[fitting]) <= self.max_bytes:
                    total += len(frames[fitting])
                    fitting += 1
                if fitting:
                    if segments and sizes[-1] < self.segment_bytes:
                        number = segments[-1]
                    else:
                        number = segments[-1] + 1 if segments else max(self._head(segments).segment, 1)
                    self._append_file(self._segment(number), b"".join(frames[:fitting]))
        except OSError as error:
            log.error("audit spool %s not writable: %s", self.directory, error.strerror or type(error).__name__)
            self.count_drops(SPOOL_UNWRITABLE, records)
            return list(records)
        refused = list(records[fitting:])
        self.count_drops(SPOOL_FULL, refused)
        return refused

    def _append_file(self, path: Path, data: bytes) -> None:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no torn frame left behind (disk full, I/O error)
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(path.parent)

    def reject(self, records: Sequence[Record]) -> None:
        """Records the database refused one by one: kept in ``rejected.seg`` (while within the spool's
        bound), counted and logged."""
        if not records:
            return
        try:
            with self._locked(create=True):
                path = self.directory / "rejected.seg"
                if not path.exists() or path.stat().st_size < self.max_bytes:
                    self._append_file(path, b"".join(frame(r) for r in records))
        except OSError as error:
            log.error("audit spool %s: cannot keep rejected records: %s", self.directory, type(error).__name__)
        self.count_drops(REJECTED, records)

    def count_drops(self, reason: str, records: Sequence[Record]) -> None:
        """Count records not stored under ``reason`` (in this process and in ``drops.json``), and log one
        JSON line per record: timestamp, reason, hookInstance, service, record key."""
        self._drop(reason, [r.describe() for r in records])

    def _drop(self, reason: str, what: Sequence[dict[str, Any]]) -> None:
        if not what:
            return
        now = dt.datetime.now(dt.UTC).isoformat()
        for item in what:
            log.error(orjson.dumps({"timestamp": now, "event": "audit_record_dropped", "reason": reason,
                                    "hookInstance": None, **item}).decode())
        self._count(reason, len(what))

    def _count(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        try:
            with self._locked(create=True):
                counts = self._drops()
                counts[reason] = counts.get(reason, 0) + n
                _replace(self.directory / "drops.json", orjson.dumps(counts))
        except OSError as error:
            log.error("audit spool %s: cannot count drops: %s", self.directory, type(error).__name__)

    def _drops(self) -> dict[str, int]:
        try:
            counts = orjson.loads((self.directory / "drops.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}

    # --- replay -------------------------------------------------------------------------------

    def has_backlog(self) -> bool:
        """True while any record waits (cheap: a directory listing)."""
        return bool(self._segments())

    def read(self, max_records: int = 100, max_bytes: int = 16 << 20) -> Chunk | None:
        """The next records after the head (at least one), or None when the spool is empty. Bytes that are
        not a valid frame are set aside in ``corrupt-*.bin`` and counted; a drained segment is deleted."""
        while True:
            with self._locked(create=False) as exists:
                if not exists:
                    return None
                segments = self._segments()
                if not segments:
                    return None
                head = self._head(segments)
                if head.segment not in segments:
                    head = Position(next((s for s in segments if s > head.segment), segments[-1]), 0)
                records, end, corrupt = self._read_frames(head, max_records, max_bytes)
            self._drop(CORRUPT, corrupt)
            if records:
                return Chunk(records, end)
            self.advance(end)

    def _read_frames(self, head: Position, max_records: int,
                     max_bytes: int) -> tuple[list[Record], Position, list[dict[str, Any]]]:
        path = self._segment(head.segment)
        records: list[Record] = []
        corrupt: list[dict[str, Any]] = []
        offset = head.offset
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            read = 0
            while offset < size and len(records) < max_records and read < max_bytes:
                record, length = self._frame_at(f, offset, size)
                if record is not None:
                    records.append(record)
                    offset += length
                    read += length
                    continue
                f.seek(offset + 1)
                rest = f.read(size - offset - 1)
                found = rest.find(MAGIC)
                resume = size if found < 0 else offset + 1 + found
                f.seek(offset)
                garbage = f.read(resume - offset)
                quarantine = self.directory / f"corrupt-{head.segment:012d}-{offset}.bin"
                quarantine.write_bytes(garbage)
                log.error("audit spool %s: %d bytes at %s:%d are not a valid record; kept in %s", self.directory,
                          len(garbage), path.name, offset, quarantine.name)
                corrupt.append({"kind": "unreadable", "bytes": len(garbage), "kept_in": quarantine.name})
                offset = resume
        return records, Position(head.segment, offset), corrupt

    @staticmethod
    def _frame_at(f: Any, offset: int, size: int) -> tuple[Record | None, int]:
        f.seek(offset)
        header = f.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return None, 0
        magic, length, crc, stamp = _FRAME.unpack(header)
        if magic != MAGIC or offset + _FRAME.size + length > size:
            return None, 0
        payload = f.read(length)
        if zlib.crc32(_TIME.pack(stamp) + payload) != crc:
            return None, 0
        try:
            return decode(payload), _FRAME.size + length
        except ValueError:
            return None, 0

    def advance(self, end: Position) -> None:
        """Everything before ``end`` is in the database: move the head there (durably), and delete the
        segment once it is drained."""
        with self._locked(create=True):
            segments = self._segments()
            path = self._segment(end.segment)
            if path.exists() and end.offset < path.stat().st_size:
                self._set_head(end)
                return
            later = [s for s in segments if s > end.segment]
            self._set_head(Position(later[0] if later else end.segment + 1, 0))
            for number in segments:
                if number <= end.segment:
                    self._segment(number).unlink(missing_ok=True)

    def acquire_replay(self) -> bool:
        """Become the one process that replays this spool (non-blocking); True when this process is."""
        if self._replay_fd is not None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "replay.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._replay_fd = fd
        return True

    def release_replay(self) -> None:
        if self._replay_fd is not None:
            os.close(self._replay_fd)
            self._replay_fd = None

    def _replay_held(self) -> bool:
        if self._replay_fd is not None:
            return True
        try:
            fd = os.open(self.directory / "replay.lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # --- status -------------------------------------------------------------------------------

    def status(self) -> SpoolStatus:
        """What waits (records, bytes, the oldest record's time), drops per reason, and whether a process
        is replaying. Reads frame headers only."""
        records = size = 0
        oldest: dt.datetime | None = None
        with self._locked(create=False) as exists:
            if exists:
                segments = self._segments()
                if segments:
                    head = self._head(segments)
                    for number in segments:
                        start = head.offset if number == head.segment else 0
                        n, nbytes, first = self._scan(self._segment(number), start)
                        records += n
                        size += nbytes
                        if oldest is None and first is not None:
                            oldest = _EPOCH + dt.timedelta(microseconds=first)
        return SpoolStatus(str(self.directory), records, size, self.max_bytes, oldest, self._drops(),
                           self._replay_held())

    @staticmethod
    def _scan(path: Path, start: int) -> tuple[int, int, int | None]:
        count = 0
        first: int | None = None
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = start
            while offset + _FRAME.size <= size:
                f.seek(offset)
                magic, length, _crc, stamp = _FRAME.unpack(f.read(_FRAME.size))
                if magic != MAGIC:
                    break
                first = stamp if first is None else first
                count += 1
                offset += _FRAME.size + length
        return count, max(size - start, 0), first

    def close(self) -> None:
        self.release_replay()
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
