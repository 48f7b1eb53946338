"""An uploaded Skill's files, checked and unpacked: one zip archive, or the
files of one top-level directory, whose `SKILL.md` starts with YAML front
matter naming the skill; and a stored version's copy into a session.

Uploads are hostile until proven otherwise. Every path is checked before
anything is written (no `..`, absolute, drive or backslash forms, no
control characters, no duplicates); zip entries must be plain files or
directories (symlinks and devices are refused from their mode bits) stored
or deflated; sizes are counted from the bytes actually decompressed, never
from the headers, against per-file, total and ratio caps. Files are only
ever created fresh (`O_EXCL`) under a directory the caller made for them.
Every refusal is an InvalidRequestError naming the `files` field.

The skill's name comes from the front matter; the top-level directory's own
name is not required to match it (OpenAI does not say it must, and installs
go to `skills/<name>/` whatever the upload's directory was called).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import yaml

from mistralrs_serve.errors import InvalidRequestError

MAX_FILES = 500  # as OpenAI's `files` (maxItems: 500)
MAX_FILE_BYTES = 10 << 20
MAX_TOTAL_BYTES = 50 << 20  # of all files unpacked, and of an uploaded archive
MAX_RATIO = 100  # decompressed / compressed, per zip entry, once past RATIO_FLOOR_BYTES
RATIO_FLOOR_BYTES = 1 << 20  # small files may compress far better than MAX_RATIO, harmlessly
MAX_PATH_CHARS = 1024
MAX_COMPONENT_CHARS = 255
# The central directory is parsed whole by zipfile: bounding it bounds memory before any check runs.
MAX_CENTRAL_DIR_BYTES = MAX_FILES * 4096
MAX_FRONT_MATTER_BYTES = 16 << 10
MAX_NAME_CHARS = 64  # the Agent Skills rules (agentskills.io): 1-64 characters
MAX_DESCRIPTION_CHARS = 1024  # and 1-1024 for the description
SKILL_FILE = "SKILL.md"
PARAM = "files"

_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ALLOWED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # bz2 and lzma decompress unbounded
_CHUNK_BYTES = 64 << 10
_EOCD = b"PK\x05\x06"
_EOCD_BYTES = 22
_MACOS_METADATA = "__MACOSX"  # resource forks macOS's Finder adds beside the folder it zips: skipped


@dataclass(frozen=True)
class UploadPart:
    """One multipart `files` part: its file name (a relative path for directory uploads) and bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class SkillManifest:
    """What an unpacked upload is: the front matter's name and description, and its size."""

    name: str
    description: str
    num_files: int
    num_bytes: int


def unpack(parts: Sequence[UploadPart], dest: Path) -> SkillManifest:
    """Check an upload and write its top-level directory's contents into dest (an
    empty directory the caller owns and removes on failure)."""
    if not parts:
        raise _refuse("no files were uploaded: send one zip archive or the files of one skill directory")
    if len(parts) == 1 and _is_zip(parts[0]):
        entries = _zip_entries(parts[0].data)
    else:
        entries = _directory_entries(parts)
    return _write(entries, dest)


def check_name(name: object, where: str = f"{SKILL_FILE} front matter") -> str:
    if not isinstance(name, str) or not name:
        raise _refuse(f"{where}: 'name' is required: a string of lowercase letters, digits and hyphens")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise _refuse(
            f"{where}: name {name[:80]!r} is invalid: 1-{MAX_NAME_CHARS} lowercase letters, digits and "
            "single hyphens, not starting or ending with a hyphen"
        )
    return name


def parse_front_matter(text: str) -> tuple[str, str]:
    """(name, description) from SKILL.md's leading `---` YAML block."""
    lines = text.removeprefix("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        raise _refuse(
            f"{SKILL_FILE} must start with YAML front matter: a '---' line, 'name' and 'description'"
        )
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        raise _refuse(f"{SKILL_FILE} front matter has no closing '---' line")
    block = "\n".join(lines[1:end])
    if len(block.encode()) > MAX_FRONT_MATTER_BYTES:
        raise _refuse(f"{SKILL_FILE} front matter is over {MAX_FRONT_MATTER_BYTES} bytes")
    try:
        meta = yaml.safe_load(block)
    except (yaml.YAMLError, RecursionError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _refuse(f"{SKILL_FILE} front matter is not valid YAML: {detail[:200]}") from None
    if not isinstance(meta, dict):
        raise _refuse(f"{SKILL_FILE} front matter must be a YAML mapping with 'name' and 'description'")
    name = check_name(meta.get("name"))
    description = meta.get("description")
    if not isinstance(description, str) or not description.strip():
        raise _refuse(f"{SKILL_FILE} front matter: 'description' is required: a non-empty string")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise _refuse(f"{SKILL_FILE} front matter: description is over {MAX_DESCRIPTION_CHARS} characters")
    return name, description.strip()


# the two layouts, as (path parts, mode, stream) without writing anything


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]  # checked path components, the top-level directory first
    is_executable: bool
    source: zipfile.ZipInfo | bytes
    archive: zipfile.ZipFile | None = None


def _is_zip(part: UploadPart) -> bool:
    return part.filename.lower().endswith(".zip") or part.data.startswith(_ZIP_MAGIC)


def _directory_entries(parts: Sequence[UploadPart]) -> list[_Entry]:
    if len(parts) > MAX_FILES:
        raise _refuse(f"too many files: {len(parts)}, at most {MAX_FILES}")
    return [_Entry(_check_path(p.filename), False, p.data) for p in parts]


def _zip_entries(data: bytes) -> list[_Entry]:
    if len(data) > MAX_TOTAL_BYTES:
        raise _refuse(f"the zip archive is over {MAX_TOTAL_BYTES} bytes")
    _check_central_directory(data)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise _refuse(f"the upload is not a readable zip archive: {e}") from None
    if len(infos) > 2 * MAX_FILES:  # room for one directory entry per file
        raise _refuse(f"too many entries in the zip archive: {len(infos)}, at most {MAX_FILES} files")
    entries = []
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise _refuse(f"{info.filename[:200]!r} is a symbolic link: links are not allowed in a skill")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(f"{info.filename[:200]!r} is not a regular file or directory")
        if info.flag_bits & 0x1:
            raise _refuse(f"{info.filename[:200]!r} is encrypted: encrypted archives are not supported")
        if info.compress_type not in _ALLOWED_METHODS:
            raise _refuse(f"{info.filename[:200]!r} uses an unsupported compression: use stored or deflate")
        path = _check_path(info.filename.removesuffix("/") if info.is_dir() else info.filename)
        if not info.is_dir() and path[0] != _MACOS_METADATA:
            entries.append(_Entry(path, bool((info.external_attr >> 16) & 0o111), info, archive))
    return entries


def _check_central_directory(data: bytes) -> None:
    """Refuse an archive whose end record declares a central directory past the cap."""
    at = data.rfind(_EOCD, max(0, len(data) - (1 << 16) - _EOCD_BYTES))
    if at < 0 or at + _EOCD_BYTES > len(data):
        raise _refuse("the upload is not a readable zip archive: no end of central directory record")
    cd_bytes = int.from_bytes(data[at + 12 : at + 16], "little")
    if cd_bytes > MAX_CENTRAL_DIR_BYTES:
        raise _refuse(f"the zip archive's directory is too large: at most {MAX_FILES} files")


def _check_path(raw: str) -> tuple[str, ...]:
    """The components of a relative path, or a refusal: nothing in it may leave its root."""
    shown = repr(raw[:200])
    if not raw or len(raw) > MAX_PATH_CHARS:
        raise _refuse(f"file name {shown} is empty or over {MAX_PATH_CHARS} characters")
    if "\\" in raw:
        raise _refuse(f"file name {shown} contains a backslash: use '/' between directories")
    if any(not c.isprintable() for c in raw):
        raise _refuse(f"file name {shown} contains control characters")
    if raw.startswith("/") or re.match(r"[A-Za-z]:", raw):
        raise _refuse(f"file name {shown} is an absolute path: names must be relative")
    parts = raw.split("/")
    for part in parts:
        decoded = urllib.parse.unquote(part)
        if part in ("", ".", "..") or decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise _refuse(
                f"file name {shown} has an empty, '.' or '..' component: paths may not leave the skill"
            )
        if len(part.encode()) > MAX_COMPONENT_CHARS:
            raise _refuse(f"file name {shown} has a component over {MAX_COMPONENT_CHARS} bytes")
    return tuple(PurePosixPath(*parts).parts)


# writing, with every cap checked on the bytes actually read


def _write(entries: list[_Entry], dest: Path) -> SkillManifest:
    root = _single_root(entries)
    if len(entries) > MAX_FILES:
        raise _refuse(f"too many files: {len(entries)}, at most {MAX_FILES}")
    _check_no_clashes(entries)
    total = 0
    for entry in entries:
        target = dest.joinpath(*entry.parts[1:])
        if not target.parent.resolve().is_relative_to(dest.resolve()):  # _check_path already ensures it
            raise _refuse(f"file name {'/'.join(entry.parts)!r} leaves the skill directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        total += _write_file(entry, target, MAX_TOTAL_BYTES - total)
    skill_md = dest / SKILL_FILE
    if not skill_md.is_file():
        raise _refuse(
            f"{root}/{SKILL_FILE} is missing: a skill's top-level directory must contain {SKILL_FILE}"
        )
    try:
        text = skill_md.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _refuse(f"{SKILL_FILE} is not UTF-8 text") from None
    name, description = parse_front_matter(text)
    return SkillManifest(name, description, num_files=len(entries), num_bytes=total)


def _single_root(entries: list[_Entry]) -> str:
    if not entries:
        raise _refuse("the upload holds no files")
    roots = sorted({e.parts[0] for e in entries})
    at_top = [e.parts[0] for e in entries if len(e.parts) == 1]
    if at_top:
        raise _refuse(
            f"{at_top[0][:200]!r} is at the top level: upload one directory holding {SKILL_FILE}, "
            "with each file named by its path, e.g. my-skill/SKILL.md"
        )
    if len(roots) > 1:
        raise _refuse(f"the upload has {len(roots)} top-level directories ({', '.join(roots[:5])}): send one")
    return roots[0]


def _check_no_clashes(entries: Iterable[_Entry]) -> None:
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for e in entries:
        if e.parts in files or e.parts in dirs:
            raise _refuse(f"{'/'.join(e.parts)[:200]!r} appears twice in the upload")
        files.add(e.parts)
        dirs.update(e.parts[:i] for i in range(1, len(e.parts)))
    clash = files & dirs
    if clash:
        raise _refuse(f"{'/'.join(min(clash))[:200]!r} is both a file and a directory")


def _write_file(entry: _Entry, target: Path, budget: int) -> int:
    mode = 0o755 if entry.is_executable else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out:
        num_bytes = _copy_entry(entry, out, budget)
        out.flush()
        os.fsync(out.fileno())  # durable before the version is recorded
    return num_bytes


def _copy_entry(entry: _Entry, out: IO[bytes], budget: int) -> int:
    if isinstance(entry.source, bytes):
        _check_sizes(entry, len(entry.source), budget)
        out.write(entry.source)
        return len(entry.source)
    assert entry.archive is not None  # a ZipInfo source always comes with its archive
    try:
        with entry.archive.open(entry.source) as stream:
            return _copy_capped(entry, stream, out, budget)
    except InvalidRequestError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError) as e:
        raise _refuse(f"{'/'.join(entry.parts)[:200]!r} cannot be read from the archive: {e}") from None


def _copy_capped(entry: _Entry, stream: IO[bytes], out: IO[bytes], budget: int) -> int:
    assert isinstance(entry.source, zipfile.ZipInfo)
    compressed = max(entry.source.compress_size, 1)
    num_bytes = 0
    while chunk := stream.read(_CHUNK_BYTES):
        num_bytes += len(chunk)
        _check_sizes(entry, num_bytes, budget)
        if num_bytes > RATIO_FLOOR_BYTES and num_bytes > MAX_RATIO * compressed:
            raise _refuse(
                f"{'/'.join(entry.parts)[:200]!r} decompresses over {MAX_RATIO} times its compressed size: "
                "refused as a zip bomb"
            )
        out.write(chunk)
    return num_bytes


def _check_sizes(entry: _Entry, num_bytes: int, budget: int) -> None:
    if num_bytes > MAX_FILE_BYTES:
        raise _refuse(f"{'/'.join(entry.parts)[:200]!r} is over {MAX_FILE_BYTES} bytes, the cap per file")
    if num_bytes > budget:
        raise _refuse(f"the skill's files are over {MAX_TOTAL_BYTES} bytes in all")


# installing a stored version into a session directory


def install_tree(source: Path, dest_dir: Path, name: str) -> Path:
    """Copy source to dest_dir/skills/<name>/, replacing what was there.

    dest_dir is a session directory that sandboxed code writes to, so any
    link it planted where the copy goes is removed, never followed: the copy
    is made in a fresh directory and renamed over the final name.
    """
    skills = dest_dir / "skills"
    _replace_link(skills)
    skills.mkdir(parents=True, exist_ok=True)
    if skills.resolve() != dest_dir.resolve() / "skills":
        raise OSError(f"{skills} does not stay inside {dest_dir}")
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=skills))
    try:
        shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
        target = skills / name
        _replace_link(target)
        if target.exists():
            old = skills / f".old-{uuid.uuid4().hex}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_link(path: Path) -> None:
    """Remove path if it is a link or a plain file (something other than a directory)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, PARAM)
