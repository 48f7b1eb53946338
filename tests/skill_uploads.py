"""Skill uploads for the store and HTTP tests: a good skill as a directory and
as a zip, and every hostile upload the Skills API must refuse with a 400
naming `files` (as (filename, bytes) parts, with the message it must give
and any cap lowered so that the case stays small)."""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

Parts = list[tuple[str, bytes]]


def skill_md(name: str = "my-skill", description: str = "Says hello in three languages.") -> bytes:
    return f"---\nname: {name}\ndescription: {description}\n---\n# Hello\nRun scripts/hello.py.\n".encode()


def directory(
    root: str = "my-skill", md: bytes | None = None, extra: dict[str, bytes] | None = None
) -> Parts:
    """A skill directory's files as parts named by their path; extra maps more names to bytes."""
    parts = [(f"{root}/SKILL.md", skill_md() if md is None else md)]
    parts.append((f"{root}/scripts/hello.py", b"print('hello')\n"))
    parts += [(f"{root}/{name}", data) for name, data in (extra or {}).items()]
    return parts


def zip_of(entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the zip-duplicate case repeats a name on purpose
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def good_zip(root: str = "my-skill", md: bytes | None = None) -> bytes:
    script = zipfile.ZipInfo(f"{root}/scripts/hello.py")
    script.external_attr = (stat.S_IFREG | 0o755) << 16
    return zip_of([(f"{root}/SKILL.md", skill_md() if md is None else md), (script, b"print('hello')\n")])


def _entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


def _patch_central(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite a field of the first central directory header (the headers zipfile trusts)."""
    at = data.index(b"PK\x01\x02") + offset
    return data[:at] + value + data[at + len(value) :]


def _patch_end(data: bytes, offset: int, value: bytes) -> bytes:
    at = data.rindex(b"PK\x05\x06") + offset
    return data[:at] + value + data[at + len(value) :]


def _zip(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> Parts:
    """A zip upload of a good SKILL.md and the given entries."""
    return [("skill.zip", zip_of([("my-skill/SKILL.md", skill_md()), *entries]))]


@dataclass(frozen=True)
class Hostile:
    id: str
    parts: Parts
    message: str  # in the 400's message
    caps: dict[str, int] = field(default_factory=dict)  # store.skill_bundle constants lowered for it


_LINK = _entry("my-skill/link", stat.S_IFLNK | 0o777)
_DEVICE = _entry("my-skill/dev", stat.S_IFCHR | 0o600)
_MANY = [(f"my-skill/f{i}.txt", b"x") for i in range(6)]
_STORED = zip_of([("my-skill/SKILL.md", skill_md()), ("my-skill/big.bin", bytes(range(256)) * 64)], 0)

HOSTILE: list[Hostile] = [
    Hostile("traversal", directory(extra={"../../evil.txt": b"x"}), "'..' component"),
    Hostile("traversal-root", [("../SKILL.md", skill_md())], "'..' component"),
    Hostile("encoded-traversal", directory(extra={"%2e%2e/%2e%2e/evil.txt": b"x"}), "'..' component"),
    Hostile("encoded-slash", directory(extra={"a%2f..%2f..%2fevil.txt": b"x"}), "'..' component"),
    Hostile("backslash", directory(extra={"..\\..\\evil.txt": b"x"}), "backslash"),
    Hostile("absolute", [("/tmp/my-skill/SKILL.md", skill_md())], "absolute path"),
    Hostile("drive", [("C:/my-skill/SKILL.md", skill_md())], "absolute path"),
    Hostile("control-characters", directory(extra={"a\nb.txt": b"x"}), "control characters"),
    Hostile("zip-traversal", _zip(("../../evil.txt", b"x")), "'..' component"),
    Hostile("zip-absolute", _zip(("/tmp/evil.txt", b"x")), "absolute path"),
    Hostile("zip-symlink", _zip((_LINK, b"/etc/passwd")), "symbolic link"),
    Hostile("zip-device", _zip((_DEVICE, b"")), "not a regular file"),
    Hostile("zip-bomb-ratio", _zip(("my-skill/zeros.bin", bytes(3 << 20))), "zip bomb"),
    Hostile(
        "zip-file-cap",
        [("skill.zip", _STORED)],
        "cap per file",
        {"MAX_FILE_BYTES": 4096},
    ),
    Hostile(
        "zip-total-cap",
        _zip(*[(f"my-skill/{i}.txt", bytes(range(256)) * 8) for i in range(4)]),
        "in all",
        {"MAX_TOTAL_BYTES": 6000},
    ),
    # the header says 10 bytes: zipfile stops there, and the CRC of what it read does not match
    Hostile(
        "zip-lying-header",
        [("skill.zip", _patch_central(_STORED, 24, (10).to_bytes(4, "little")))],
        "cannot be read from the archive",
    ),
    Hostile(
        "zip-bzip2",
        [("skill.zip", zip_of([("my-skill/SKILL.md", skill_md())], zipfile.ZIP_BZIP2))],
        "unsupported compression",
    ),
    Hostile("zip-encrypted", [("skill.zip", _patch_central(good_zip(), 8, b"\x01\x00"))], "encrypted"),
    Hostile(
        "zip-huge-directory",
        [("skill.zip", _patch_end(good_zip(), 12, b"\xff\xff\xff\x7f"))],
        "directory is too large",
    ),
    Hostile("zip-duplicate", _zip(("my-skill/SKILL.md", skill_md())), "appears twice"),
    Hostile("zip-file-and-dir", _zip(("my-skill/a", b"x"), ("my-skill/a/b", b"y")), "both a file and"),
    Hostile(
        "zip-many-files",
        [("skill.zip", zip_of([("my-skill/SKILL.md", skill_md()), *_MANY]))],
        "too many",
        {"MAX_FILES": 5},
    ),
    Hostile("many-files", [("my-skill/SKILL.md", skill_md()), *_MANY], "too many", {"MAX_FILES": 5}),
    Hostile(
        "dir-file-cap", directory(extra={"big.bin": bytes(5000)}), "cap per file", {"MAX_FILE_BYTES": 4096}
    ),
    Hostile(
        "dir-total-cap",
        directory(extra={f"{i}.bin": bytes(2000) for i in range(4)}),
        "in all",
        {"MAX_TOTAL_BYTES": 6000},
    ),
    Hostile("two-top-level", [*directory("one"), *directory("two")], "2 top-level directories"),
    Hostile("top-level-file", [("SKILL.md", skill_md())], "at the top level"),
    Hostile("not-a-zip", [("notes.txt", b"just some notes")], "at the top level"),
    Hostile("empty-zip-file", [("skill.zip", b"")], "not a readable zip"),
    Hostile("garbage-zip", [("skill.zip", b"PK\x03\x04" + bytes(100))], "not a readable zip"),
    Hostile("zip-without-files", [("skill.zip", zip_of([]))], "no files"),
    Hostile("missing-skill-md", [("my-skill/README.md", b"# hi\n")], "SKILL.md is missing"),
    Hostile("no-front-matter", directory(md=b"# Hello\n"), "must start with YAML front matter"),
    Hostile("unclosed-front-matter", directory(md=b"---\nname: my-skill\n"), "no closing"),
    Hostile("bad-yaml", directory(md=b"---\nname: [my-skill\ndescription: x\n---\n"), "not valid YAML"),
    Hostile(
        "nested-yaml", directory(md=b"---\nname: " + b"[" * 3000 + b"]" * 3000 + b"\n---\n"), "not valid YAML"
    ),
    Hostile("front-matter-list", directory(md=b"---\n- name\n- description\n---\n"), "YAML mapping"),
    Hostile("no-name", directory(md=b"---\ndescription: x\n---\n"), "'name' is required"),
    Hostile("name-not-string", directory(md=b"---\nname: 12\ndescription: x\n---\n"), "'name' is required"),
    Hostile("name-uppercase", directory(md=skill_md(name="My-Skill")), "is invalid"),
    Hostile("name-spaces", directory(md=skill_md(name="my skill")), "is invalid"),
    Hostile("name-double-hyphen", directory(md=skill_md(name="my--skill")), "is invalid"),
    Hostile("name-leading-hyphen", directory(md=skill_md(name="-skill")), "is invalid"),
    Hostile("name-traversal", directory(md=skill_md(name="../../etc")), "is invalid"),
    Hostile("name-too-long", directory(md=skill_md(name="a" * 65)), "is invalid"),
    Hostile("no-description", directory(md=b"---\nname: my-skill\n---\n"), "'description' is required"),
    Hostile(
        "blank-description",
        directory(md=b"---\nname: my-skill\ndescription: '  '\n---\n"),
        "'description' is required",
    ),
    Hostile("description-too-long", directory(md=skill_md(description="d" * 1025)), "over 1024"),
    Hostile("skill-md-not-utf8", directory(md=b"---\nname: my-skill\ndescription: \xff\xfe\n---\n"), "UTF-8"),
]


def tree(root: Path) -> set[str]:
    """Every path under root, relative, for 'nothing was written outside' checks."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}
