"""Versioned schema of the inspection database.

Each migration is a numbered step applied once, in order, inside one transaction with the row that
records it in ``defectlens_schema``. A step is never edited after release: a later change of the
schema is a new step. Tables are declared here only; the store reflects them from the database.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        inspect, select)
from sqlalchemy.engine import Connection, Engine


class SchemaError(RuntimeError):
    """The database belongs to a newer defectlens, or is not an inspection database."""


def _v1_inspections_and_feedback(connection: Connection) -> None:
    metadata = MetaData()
    Table(
        "inspections", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", DateTime, nullable=False),
        Column("model", String(64), nullable=False),
        Column("source_name", String(255)),
        Column("image_key", String(80), nullable=False),
        Column("width", Integer, nullable=False),
        Column("height", Integer, nullable=False),
        Column("score", Float, nullable=False),
        Column("threshold", Float),
        # 'anomalous' | 'normal'; NULL when the model has no threshold.
        Column("label", String(16)),
        Column("inference_ms", Float, nullable=False),
        Column("map_key", String(80)),
        Column("overlay_key", String(80)),
        # The operator's latest verdict ('anomalous' | 'normal'); the feedback table keeps them all.
        Column("verdict", String(16)),
        Column("verdict_by", String(64)),
        Column("verdict_at", DateTime),
        Index("ix_inspections_model_id", "model", "id"),
        Index("ix_inspections_created_at", "created_at"),
        Index("ix_inspections_model_verdict", "model", "verdict"),
    )
    Table(
        "feedback", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("inspection_id", Integer, ForeignKey("inspections.id"), nullable=False, index=True),
        Column("verdict", String(16), nullable=False),
        Column("operator", String(64)),
        Column("note", Text),
        Column("created_at", DateTime, nullable=False),
    )
    metadata.create_all(connection)


#: (version, what it does, step). Append only.
MIGRATIONS = [
    (1, "inspections and operator feedback", _v1_inspections_and_feedback),
]
LATEST = MIGRATIONS[-1][0]

_versions = Table(
    "defectlens_schema", MetaData(),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime, nullable=False),
)


def schema_version(connection: Connection) -> int:
    if not inspect(connection).has_table(_versions.name):
        return 0
    return connection.execute(select(_versions.c.version).order_by(_versions.c.version.desc()).limit(1)).scalar() or 0


def migrate(engine: Engine) -> list[int]:
    """Bring the database to :data:`LATEST`; returns the versions applied now."""
    applied = []
    with engine.begin() as connection:
        existing = set(inspect(connection).get_table_names())
        current = schema_version(connection)
        if current == 0 and "inspections" in existing:
            raise SchemaError(f"{engine.url!r} has an 'inspections' table but no defectlens schema version; "
                              "it is not a defectlens inspection database")
        if current > LATEST:
            raise SchemaError(f"the inspection database is at schema version {current}, newer than this "
                              f"defectlens knows ({LATEST}); upgrade defectlens to serve from it")
        _versions.create(connection, checkfirst=True)
        for version, description, step in MIGRATIONS:
            if version > current:
                step(connection)
                connection.execute(_versions.insert().values(
                    version=version, description=description,
                    applied_at=datetime.now(timezone.utc).replace(tzinfo=None)))
                applied.append(version)
    return applied
