"""The inspection history: one row per inspected image, operator verdicts, in any SQLAlchemy database.

SQLite (the default) runs in WAL mode with full synchronous commits: a committed inspection
survives a kill -9 or a power cut, and a crash never leaves the file unreadable.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import MetaData, Table, and_, create_engine, event, func, select, text
from sqlalchemy.engine import make_url

from .migrations import migrate

VERDICTS = ("normal", "anomalous")


def utcnow() -> datetime:
    # Stored naive, always UTC: SQLite has no time zones and the API adds the 'Z'.
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class InspectionFilter:
    model: str | None = None
    label: str | None = None
    verdict: str | None = None  # 'normal' | 'anomalous' | 'none' (not reviewed)
    since: datetime | None = None
    until: datetime | None = None


class InspectionStore:
    def __init__(self, url: str):
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        options = {"pool_pre_ping": True}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **options)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        metadata = MetaData()
        self.inspections = Table("inspections", metadata, autoload_with=self.engine)
        self.feedback = Table("feedback", metadata, autoload_with=self.engine)
        # SQLite has one writer at a time; a lock keeps this process's writers in line instead of
        # failing on 'database is locked' when two transactions try to upgrade to writing at once.
        self._write_lock = threading.Lock() if self.is_sqlite else nullcontext()

    def close(self) -> None:
        self.engine.dispose()

    def unusable(self) -> str | None:
        """Why inspections cannot be stored (the database unreachable, or its SQLite file deleted
        under the service, which an open connection would not notice), or None."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = self.engine.url.database
        if self.is_sqlite and database and database != ":memory:" and not Path(database).is_file():
            return f"the database file {database} is gone"
        return None

    # -- writing ------------------------------------------------------------------------------
    def add(self, records: list[dict]) -> list[int]:
        """Insert inspections in one transaction; returns their ids once committed."""
        ids = []
        with self._write_lock, self.engine.begin() as connection:
            for record in records:
                result = connection.execute(self.inspections.insert().values(**record))
                ids.append(int(result.inserted_primary_key[0]))
        return ids

    def set_verdict(self, inspection_id: int, verdict: str, operator: str | None, note: str | None) -> dict | None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        now = utcnow()
        with self._write_lock, self.engine.begin() as connection:
            updated = connection.execute(self.inspections.update().where(self.inspections.c.id == inspection_id)
                                         .values(verdict=verdict, verdict_by=operator, verdict_at=now))
            if updated.rowcount == 0:
                return None
            connection.execute(self.feedback.insert().values(inspection_id=inspection_id, verdict=verdict,
                                                             operator=operator, note=note, created_at=now))
        return self.get(inspection_id)

    # -- reading ------------------------------------------------------------------------------
    def _where(self, filters: InspectionFilter):
        c = self.inspections.c
        conditions = []
        if filters.model:
            conditions.append(c.model == filters.model)
        if filters.label:
            conditions.append(c.label == filters.label)
        if filters.verdict == "none":
            conditions.append(c.verdict.is_(None))
        elif filters.verdict:
            conditions.append(c.verdict == filters.verdict)
        if filters.since:
            conditions.append(c.created_at >= filters.since)
        if filters.until:
            conditions.append(c.created_at < filters.until)
        return and_(True, *conditions)

    def list(self, filters: InspectionFilter, limit: int = 50, before_id: int | None = None,
             after_id: int | None = None) -> list[dict]:
        """Newest first; ``before_id`` pages back, ``after_id`` fetches what is new since a poll."""
        c = self.inspections.c
        query = select(self.inspections).where(self._where(filters))
        if before_id is not None:
            query = query.where(c.id < before_id)
        if after_id is not None:
            query = query.where(c.id > after_id)
        query = query.order_by(c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def count(self, filters: InspectionFilter | None = None) -> int:
        query = select(func.count()).select_from(self.inspections).where(self._where(filters or InspectionFilter()))
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar())

    def get(self, inspection_id: int) -> dict | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(self.inspections).where(self.inspections.c.id == inspection_id)).first()
        return None if row is None else dict(row._mapping)

    def recent_scores(self, model: str, limit: int) -> list[tuple[float, str | None]]:
        """(score, verdict) of the model's latest ``limit`` inspections."""
        c = self.inspections.c
        query = select(c.score, c.verdict).where(c.model == model).order_by(c.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [(float(score), verdict) for score, verdict in connection.execute(query)]

    def verdict_scores(self, model: str, verdict: str) -> list[float]:
        c = self.inspections.c
        query = select(c.score).where(and_(c.model == model, c.verdict == verdict))
        with self.engine.connect() as connection:
            return [float(score) for (score,) in connection.execute(query)]

    def confirmed_good(self, model: str) -> list[dict]:
        """Distinct images of ``model`` whose latest operator verdict is 'normal'."""
        c = self.inspections.c
        query = (select(c.image_key, func.min(c.source_name).label("source_name"))
                 .where(and_(c.model == model, c.verdict == "normal")).group_by(c.image_key).order_by(c.image_key))
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit is fsynced, so an acknowledged inspection survives a power cut, not only a kill.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
