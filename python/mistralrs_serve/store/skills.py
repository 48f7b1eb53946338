"""Uploaded Skills: versioned directories of instructions and scripts that a
Responses `shell` tool's `skill_reference` copies into its session directory.

`SkillStore` is what the routes and the agent loop use; `SqlSkillStore`
keeps the `skills` and `skill_versions` rows in the embedded database and
each version's files in `<skills_dir>/<skill_id>/<version>/`. A version is
unpacked and checked in a staging directory (store/skill_bundle.py), renamed
into place, and only then recorded, inside one write transaction that also
numbers it: a failure leaves no row and no version directory, and a crash
at worst an orphan directory. Versions are numbered from 1 and a number is
never reused. Rows whose directory is gone when the store opens (a cleared
temp directory) are dropped, so nothing is listed that cannot be installed.
Every method blocks: async callers use a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import orjson

from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store.blobs import fsync_dir
from mistralrs_serve.store.db import Conn, Row, SqlDatabase, StoreError
from mistralrs_serve.store.skill_bundle import SkillManifest, UploadPart, install_tree, unpack

MAX_LIST_LIMIT = 100  # as OpenAI's list endpoints
DEFAULT_LIST_LIMIT = 20
STAGING_DIR = ".staging"
STALE_STAGING_S = 3600  # staging directories older than this were left by a crash
logger = logging.getLogger(__name__)
ListOrder = Literal["asc", "desc"]
VersionRef = int | str | None  # a number, "latest", or None for the default version
T = TypeVar("T", "Skill", "SkillVersion")


def default_skills_dir() -> Path:
    """<temp>/mistralrs-serve-skills, or <temp>/mistralrs-serve-skills-<uid> where the shared name is
    taken by another user or is not a plain directory (a link planted in a world-writable /tmp)."""
    shared = Path(tempfile.gettempdir()) / "mistralrs-serve-skills"
    try:
        found = os.lstat(shared)
    except FileNotFoundError:
        return shared
    if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid():
        return shared
    return shared.with_name(f"{shared.name}-{os.getuid()}")


@dataclass(frozen=True)
class Skill:
    id: str
    name: str  # the default version's
    description: str
    created_at: int
    default_version: int
    latest_version: int

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "skill",
            "name": self.name,
            "description": self.description,
            "created_at": self.created_at,
            "default_version": str(self.default_version),
            "latest_version": str(self.latest_version),
        }


@dataclass(frozen=True)
class SkillVersion:
    id: str
    skill_id: str
    version: int
    created_at: int
    name: str
    description: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "object": "skill.version",
            "id": self.id,
            "skill_id": self.skill_id,
            "version": str(self.version),
            "created_at": self.created_at,
            "name": self.name,
            "description": self.description,
        }


@dataclass(frozen=True)
class Page(Generic[T]):
    data: list[T]
    has_more: bool

    def to_openai(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [item.to_openai() for item in self.data],
            "first_id": self.data[0].id if self.data else None,
            "last_id": self.data[-1].id if self.data else None,
            "has_more": self.has_more,
        }


class SkillStore(Protocol):
    """Skills by id and their versions by number. Unknown ids raise NotFoundError;
    bad uploads InvalidRequestError naming `files`."""

    def create(self, parts: Sequence[UploadPart]) -> Skill: ...

    def create_version(
        self, skill_id: str, parts: Sequence[UploadPart], *, make_default: bool = False
    ) -> SkillVersion: ...

    def get(self, skill_id: str) -> Skill: ...

    def list(
        self, *, limit: int = DEFAULT_LIST_LIMIT, order: ListOrder = "desc", after: str | None = None
    ) -> Page[Skill]: ...

    def set_default_version(self, skill_id: str, version: VersionRef) -> Skill: ...

    def delete(self, skill_id: str) -> None:
        """The skill, its versions and their files."""
        ...

    def list_versions(
        self,
        skill_id: str,
        *,
        limit: int = DEFAULT_LIST_LIMIT,
        order: ListOrder = "desc",
        after: str | None = None,
    ) -> Page[SkillVersion]: ...

    def get_version(self, skill_id: str, version: VersionRef) -> SkillVersion: ...

    def delete_version(self, skill_id: str, version: VersionRef) -> SkillVersion:
        """Remove a version other than the default; returns what was removed."""
        ...

    def version_dir(self, skill_id: str, version: VersionRef) -> tuple[SkillVersion, Path]:
        """A version and its directory, which the caller only reads."""
        ...

    def install(self, skill_id: str, version: VersionRef, dest_dir: Path, *, param: str = "skill_id") -> Path:
        """Copy a version into dest_dir/skills/<name>/ (replacing what is there) and return that path.
        An unknown skill or version raises NotFoundError naming `param` (or its `version` sibling)."""
        ...


def parse_version(value: object, param: str = "version") -> VersionRef:
    """A version as the API writes it: a positive integer (or its digits), "latest", or None (default)."""
    if value is None:
        return None
    if value == "latest":
        return "latest"
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) > 0:
        return int(value)
    raise InvalidRequestError(f"{param} must be a positive integer or 'latest'; got {value!r}", param)


def check_list_args(limit: int, order: str) -> None:
    if not 0 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequestError(f"limit must be between 0 and {MAX_LIST_LIMIT}; got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be 'asc' or 'desc'; got {order!r}", "order")


class SqlSkillStore:
    """SkillStore over the embedded database and a directory of version trees."""

    def __init__(self, db: SqlDatabase, skills_dir: Path) -> None:
        self.db = db
        self.skills_dir = _open_skills_dir(skills_dir)
        self.staging_dir = self.skills_dir / STAGING_DIR
        self.staging_dir.mkdir(mode=0o700, exist_ok=True)
        self._clear_stale_staging()
        self._forget_missing()

    # uploads

    def create(self, parts: Sequence[UploadPart]) -> Skill:
        skill_id = f"skill_{uuid.uuid4().hex}"
        staged, manifest = self._stage(parts)
        try:
            with self.db.write() as conn:
                now = int(time.time())
                skill = Skill(skill_id, manifest.name, manifest.description, now, 1, 1)
                conn.execute(
                    "INSERT INTO skills (id, name, created_at, object_json) VALUES (?, ?, ?, ?)",
                    (skill_id, skill.name, now, _skill_json(skill, next_version=2)),
                )
                self._place(conn, staged, skill_id, 1, manifest, now)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            shutil.rmtree(self.skills_dir / skill_id, ignore_errors=True)
            raise
        return skill

    def create_version(
        self, skill_id: str, parts: Sequence[UploadPart], *, make_default: bool = False
    ) -> SkillVersion:
        self.get(skill_id)  # an unknown id is a 404 before the upload is looked at
        staged, manifest = self._stage(parts)
        final: Path | None = None
        try:
            with self.db.write() as conn:
                row = _skill_row(conn, skill_id)
                meta = orjson.loads(row["object_json"])
                number = int(meta["next_version"])
                now = int(time.time())
                final = self.skills_dir / skill_id / str(number)
                version = self._place(conn, staged, skill_id, number, manifest, now)
                skill = _skill_from(row)
                default = version if make_default else None
                self._update_skill(conn, skill, number + 1, latest=number, default=default)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            if final is not None:
                shutil.rmtree(final, ignore_errors=True)
            raise
        return version

    def _stage(self, parts: Sequence[UploadPart]) -> tuple[Path, SkillManifest]:
        staged = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_dir))
        try:
            return staged, unpack(parts, staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def _place(
        self,
        conn: Conn,
        staged: Path,
        skill_id: str,
        number: int,
        manifest: SkillManifest,
        now: int,
    ) -> SkillVersion:
        """Move a staged version into place and record it (inside the caller's transaction)."""
        version = SkillVersion(
            f"skillver_{uuid.uuid4().hex}", skill_id, number, now, manifest.name, manifest.description
        )
        relative = f"{skill_id}/{number}"
        (self.skills_dir / skill_id).mkdir(mode=0o700, exist_ok=True)
        os.chmod(staged, 0o755)  # mkdtemp made it private; the installed copy keeps the mode
        os.rename(staged, self.skills_dir / relative)
        fsync_dir(self.skills_dir / skill_id)
        obj = {**version.to_openai(), "num_files": manifest.num_files, "num_bytes": manifest.num_bytes}
        conn.execute(
            "INSERT INTO skill_versions (skill_id, version, created_at, object_json, path) "
            "VALUES (?, ?, ?, ?, ?)",
            (skill_id, number, now, orjson.dumps(obj).decode(), relative),
        )
        return version

    # skills

    def get(self, skill_id: str) -> Skill:
        rows = self.db.read("SELECT * FROM skills WHERE id = ?", (skill_id,))
        if not rows:
            raise _no_skill(skill_id, "skill_id")
        return _skill_from(rows[0])

    def list(
        self, *, limit: int = DEFAULT_LIST_LIMIT, order: ListOrder = "desc", after: str | None = None
    ) -> Page[Skill]:
        check_list_args(limit, order)
        where = ""
        args: list[int] = []
        if after is not None:
            cursor = self.db.read("SELECT rowid FROM skills WHERE id = ?", (after,))
            if not cursor:
                raise InvalidRequestError(f"after: no skill with id {after!r}", "after")
            where = "WHERE rowid < ?" if order == "desc" else "WHERE rowid > ?"
            args.append(cursor[0][0])
        direction = "DESC" if order == "desc" else "ASC"
        rows = self.db.read(
            f"SELECT * FROM skills {where} ORDER BY rowid {direction} LIMIT ?", (*args, limit + 1)
        )
        return Page([_skill_from(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def set_default_version(self, skill_id: str, version: VersionRef) -> Skill:
        with self.db.write() as conn:
            skill = _skill_from(_skill_row(conn, skill_id))
            chosen = _version_from(_version_row(conn, skill, version, "default_version"))
            return self._update_skill(conn, skill, None, latest=skill.latest_version, default=chosen)

    def delete(self, skill_id: str) -> None:
        with self.db.write() as conn:
            _skill_row(conn, skill_id)
            conn.execute("DELETE FROM skills WHERE id = ?", (skill_id,))  # versions cascade
        shutil.rmtree(self.skills_dir / skill_id, ignore_errors=True)

    def _update_skill(
        self,
        conn: Conn,
        skill: Skill,
        next_version: int | None,
        *,
        latest: int,
        default: SkillVersion | None,
    ) -> Skill:
        name = default.name if default else skill.name
        description = default.description if default else skill.description
        number = default.version if default else skill.default_version
        updated = Skill(skill.id, name, description, skill.created_at, number, latest)
        if next_version is None:
            row = conn.execute("SELECT object_json FROM skills WHERE id = ?", (skill.id,)).fetchone()
            next_version = int(orjson.loads(row[0])["next_version"])
        conn.execute(
            "UPDATE skills SET name = ?, object_json = ? WHERE id = ?",
            (name, _skill_json(updated, next_version), skill.id),
        )
        return updated

    # versions

    def list_versions(
        self,
        skill_id: str,
        *,
        limit: int = DEFAULT_LIST_LIMIT,
        order: ListOrder = "desc",
        after: str | None = None,
    ) -> Page[SkillVersion]:
        check_list_args(limit, order)
        self.get(skill_id)
        where, args = "skill_id = ?", [skill_id]
        if after is not None:
            cursor = self.db.read(
                "SELECT version FROM skill_versions WHERE skill_id = ? AND "
                f"({self.db.json_text('object_json', 'id')} = ? OR CAST(version AS TEXT) = ?)",
                (skill_id, after, after),
            )
            if not cursor:
                raise InvalidRequestError(f"after: skill {skill_id!r} has no version {after!r}", "after")
            where += " AND version < ?" if order == "desc" else " AND version > ?"
            args.append(cursor[0][0])
        direction = "DESC" if order == "desc" else "ASC"
        rows = self.db.read(
            f"SELECT * FROM skill_versions WHERE {where} ORDER BY version {direction} LIMIT ?",
            (*args, limit + 1),
        )
        return Page([_version_from(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def get_version(self, skill_id: str, version: VersionRef) -> SkillVersion:
        return self.version_dir(skill_id, version)[0]

    def version_dir(self, skill_id: str, version: VersionRef) -> tuple[SkillVersion, Path]:
        return self._version_dir(skill_id, version, "skill_id", "version")

    def delete_version(self, skill_id: str, version: VersionRef) -> SkillVersion:
        with self.db.write() as conn:
            skill = _skill_from(_skill_row(conn, skill_id))
            row = _version_row(conn, skill, version, "version")
            if row["version"] == skill.default_version:
                raise InvalidRequestError(
                    f"version {row['version']} is the default version of skill {skill_id!r}: make another "
                    f"version the default first (POST /v1/skills/{skill_id} with default_version)",
                    "version",
                )
            conn.execute(
                "DELETE FROM skill_versions WHERE skill_id = ? AND version = ?", (skill_id, row["version"])
            )
            (latest,) = conn.execute(
                "SELECT MAX(version) FROM skill_versions WHERE skill_id = ?", (skill_id,)
            ).fetchone()
            self._update_skill(conn, skill, None, latest=latest, default=None)
        shutil.rmtree(self.skills_dir / row["path"], ignore_errors=True)
        return _version_from(row)

    def install(self, skill_id: str, version: VersionRef, dest_dir: Path, *, param: str = "skill_id") -> Path:
        version_param = param.removesuffix("skill_id") + "version" if param.endswith("skill_id") else param
        found, source = self._version_dir(skill_id, version, param, version_param)
        return install_tree(source, Path(dest_dir), found.name)

    def _version_dir(
        self, skill_id: str, version: VersionRef, param: str, version_param: str
    ) -> tuple[SkillVersion, Path]:
        rows = self.db.read("SELECT * FROM skills WHERE id = ?", (skill_id,))
        if not rows:
            raise _no_skill(skill_id, param)
        row = _version_row(self.db, _skill_from(rows[0]), version, version_param)
        path = self.skills_dir / row["path"]
        if not path.is_dir():
            raise NotFoundError(
                f"the files of skill {skill_id!r} version {row['version']} are missing from the skills "
                f"directory {self.skills_dir} (was it cleared?): upload the skill again",
                param,
            )
        return _version_from(row), path

    def _forget_missing(self) -> None:
        """Drop the rows of versions whose directory is gone (a cleared temp directory, another
        --skills-dir), so that nothing is listed that cannot be installed; a skill left with no
        version goes too, one whose default went falls back to its latest."""
        rows = self.db.read("SELECT skill_id, version, path FROM skill_versions")
        missing = [(r["skill_id"], r["version"]) for r in rows if not (self.skills_dir / r["path"]).is_dir()]
        if not missing:
            return
        if self.db.shared:
            # other replicas may hold them (a skills directory of their own): never delete theirs
            logger.warning(
                "%d skill versions have no files in %s; the database is shared, so they are kept: "
                "give every replica the same --skills-dir",
                len(missing),
                self.skills_dir,
            )
            return
        logger.warning(
            "%d skill versions have no files in %s (was it cleared?): forgetting them",
            len(missing),
            self.skills_dir,
        )
        with self.db.write() as conn:
            conn.executemany("DELETE FROM skill_versions WHERE skill_id = ? AND version = ?", missing)
            for skill_id in {skill_id for skill_id, _ in missing}:
                skill = _skill_from(_skill_row(conn, skill_id))
                left = [
                    r[0]
                    for r in conn.execute(
                        "SELECT version FROM skill_versions WHERE skill_id = ? ORDER BY version", (skill_id,)
                    )
                ]
                if not left:
                    conn.execute("DELETE FROM skills WHERE id = ?", (skill_id,))
                    continue
                number = skill.default_version if skill.default_version in left else left[-1]
                default = _version_from(_version_row(conn, skill, number, "version"))
                self._update_skill(conn, skill, None, latest=left[-1], default=default)

    def _clear_stale_staging(self) -> None:
        cutoff = time.time() - STALE_STAGING_S
        for entry in self.staging_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry)


def _open_skills_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = path.resolve().stat().st_uid
    except OSError as e:
        raise StoreError(f"cannot create the skills directory {path}: {e}") from None
    if owner != os.getuid():
        raise StoreError(f"the skills directory {path} belongs to another user: pass --skills-dir")
    return path.resolve()


def _skill_row(conn: Conn, skill_id: str) -> Row:
    row: Row | None = conn.execute("SELECT * FROM skills WHERE id = ?", (skill_id,)).fetchone()
    if row is None:
        raise _no_skill(skill_id, "skill_id")
    return row


def _version_row(conn: Conn | SqlDatabase, skill: Skill, version: VersionRef, param: str) -> Row:
    """The row of a skill's version, read inside a transaction (conn) or outside one (the db)."""
    ref = parse_version(version, param)
    number = skill.default_version if ref is None else skill.latest_version if ref == "latest" else ref
    sql, args = "SELECT * FROM skill_versions WHERE skill_id = ? AND version = ?", (skill.id, number)
    rows = conn.read(sql, args) if isinstance(conn, SqlDatabase) else conn.execute(sql, args).fetchall()
    if not rows:
        raise NotFoundError(f"skill {skill.id!r} has no version {version!r}", param)
    return rows[0]


def _skill_from(row: Row) -> Skill:
    obj = orjson.loads(row["object_json"])
    return Skill(
        obj["id"],
        obj["name"],
        obj["description"],
        obj["created_at"],
        int(obj["default_version"]),
        int(obj["latest_version"]),
    )


def _skill_json(skill: Skill, next_version: int) -> str:
    """The served object, plus the next version number (numbers of deleted versions are not reused)."""
    return orjson.dumps({**skill.to_openai(), "next_version": next_version}).decode()


def _version_from(row: Row) -> SkillVersion:
    obj = orjson.loads(row["object_json"])
    return SkillVersion(
        obj["id"], obj["skill_id"], int(obj["version"]), obj["created_at"], obj["name"], obj["description"]
    )


def _no_skill(skill_id: str, param: str) -> NotFoundError:
    return NotFoundError(f"No such skill: {skill_id!r}", param)
