"""SqlSkillStore and its upload checks over a scratch directory: directory
and zip uploads, versions and their numbering, listing, delete, install into
a session directory (planted links removed, not followed), and every hostile
upload refused with a 400 naming `files`, nothing written outside the skills
directory and no partial version left behind."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mistralrs_serve.errors import InvalidRequestError, NotFoundError
from mistralrs_serve.store import skill_bundle
from mistralrs_serve.store.db import SqlDatabase
from mistralrs_serve.store.skill_bundle import UploadPart, install_tree, parse_front_matter
from mistralrs_serve.store.skills import SqlSkillStore, default_skills_dir
from skill_uploads import HOSTILE, Hostile, directory, good_zip, skill_md, tree, zip_of

OpenDb = Callable[..., SqlDatabase]  # the open_db fixture (tests/conftest.py): SQLite, then PostgreSQL


def parts(pairs: list[tuple[str, bytes]]) -> list[UploadPart]:
    return [UploadPart(name, data) for name, data in pairs]


@pytest.fixture
def store(open_db: OpenDb, tmp_path: Path) -> SqlSkillStore:
    return SqlSkillStore(open_db(tmp_path / "data"), tmp_path / "skills")


def versions_on_disk(store: SqlSkillStore) -> set[str]:
    found = {p.relative_to(store.skills_dir).as_posix() for p in store.skills_dir.glob("skill_*/*")}
    assert not list(store.staging_dir.iterdir()), "a staged upload was left behind"
    return found


def test_directory_upload(store: SqlSkillStore) -> None:
    skill = store.create(parts(directory()))
    obj = skill.to_openai()
    assert skill.id.startswith("skill_") and obj["object"] == "skill"
    assert (obj["name"], obj["default_version"], obj["latest_version"]) == ("my-skill", "1", "1")
    assert obj["description"] == "Says hello in three languages."
    root = store.skills_dir / skill.id / "1"
    assert (root / "SKILL.md").read_bytes() == skill_md()
    assert (root / "scripts" / "hello.py").read_bytes() == b"print('hello')\n"
    assert store.get(skill.id) == skill


def test_zip_upload_keeps_the_executable_bit(store: SqlSkillStore) -> None:
    skill = store.create(parts([("bundle.zip", good_zip("anything"))]))
    script = store.skills_dir / skill.id / "1" / "scripts" / "hello.py"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (store.skills_dir / skill.id / "1" / "SKILL.md").stat().st_mode & 0o777 == 0o644


def test_zip_with_directory_entries_and_finder_metadata(store: SqlSkillStore) -> None:
    archive = zip_of(
        [
            ("my-skill/", b""),
            ("my-skill/docs/", b""),
            ("my-skill/SKILL.md", skill_md()),
            ("__MACOSX/my-skill/._SKILL.md", b"resource fork"),
        ]
    )
    skill = store.create(parts([("s.zip", archive)]))
    assert tree(store.skills_dir / skill.id / "1") == {"SKILL.md"}


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_upload_is_refused_and_leaves_nothing(
    case: Hostile, store: SqlSkillStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in case.caps.items():
        monkeypatch.setattr(skill_bundle, name, value)
    existing = store.create(parts(directory()))
    before = {p for p in tree(tmp_path) if not p.startswith("data")}  # the database's files change
    with pytest.raises(InvalidRequestError) as caught:
        store.create(parts(case.parts))
    assert caught.value.param == "files" and case.message in str(caught.value), str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:
        store.create_version(existing.id, parts(case.parts))
    assert caught.value.param == "files" and case.message in str(caught.value), str(caught.value)
    assert {p for p in tree(tmp_path) if not p.startswith("data")} == before, "a file was written"
    assert versions_on_disk(store) == {f"{existing.id}/1"}
    assert [s.id for s in store.list().data] == [existing.id]
    assert store.get(existing.id).latest_version == 1


def test_empty_upload(store: SqlSkillStore) -> None:
    with pytest.raises(InvalidRequestError, match="no files were uploaded") as caught:
        store.create([])
    assert caught.value.param == "files"


def test_hostile_cases_are_otherwise_good() -> None:
    """The good upload the cases start from passes, so each case fails for its own reason."""
    assert parse_front_matter(skill_md().decode()) == ("my-skill", "Says hello in three languages.")
    name, _ = parse_front_matter("\ufeff---\nname: a-1\ndescription: >\n  folded text\n---\nbody")
    assert name == "a-1"


def test_versions_are_numbered_and_never_reused(store: SqlSkillStore) -> None:
    skill = store.create(parts(directory()))
    v2 = store.create_version(skill.id, parts(directory(md=skill_md("renamed", "Second."))))
    assert (v2.version, v2.name, v2.id.startswith("skillver_")) == (2, "renamed", True)
    after = store.get(skill.id)
    assert (after.default_version, after.latest_version, after.name) == (1, 2, "my-skill")
    v3 = store.create_version(skill.id, parts([("s.zip", good_zip())]), make_default=True)
    after = store.get(skill.id)
    assert (after.default_version, after.latest_version) == (3, 3)
    assert store.get_version(skill.id, "latest") == v3 and store.get_version(skill.id, "2") == v2
    with pytest.raises(InvalidRequestError, match="default version") as caught:
        store.delete_version(skill.id, 3)
    assert caught.value.param == "version"
    store.set_default_version(skill.id, "2")
    assert store.get(skill.id).name == "renamed"
    assert store.delete_version(skill.id, "3") == v3
    assert store.get(skill.id).latest_version == 2
    assert not (store.skills_dir / skill.id / "3").exists()
    v4 = store.create_version(skill.id, parts(directory()))
    assert v4.version == 4, "the number of a deleted version is not given again"
    listed = store.list_versions(skill.id, order="asc")
    assert [v.version for v in listed.data] == [1, 2, 4]
    obj = listed.to_openai()
    assert obj["first_id"] == listed.data[0].id and obj["data"][0]["object"] == "skill.version"
    assert obj["data"][1]["version"] == "2"


def test_version_lookups(store: SqlSkillStore) -> None:
    skill = store.create(parts(directory()))
    for bad in ("abc", "0", "-1", "1.5", "", True):
        with pytest.raises(InvalidRequestError) as caught:
            store.get_version(skill.id, bad)
        assert caught.value.param == "version"
    with pytest.raises(NotFoundError) as missing:
        store.get_version(skill.id, 7)
    assert missing.value.param == "version"
    with pytest.raises(NotFoundError) as unknown:
        store.get_version("skill_nope", 1)
    assert unknown.value.param == "skill_id"


def test_list_pagination(store: SqlSkillStore) -> None:
    ids = [store.create(parts(directory())).id for _ in range(5)]
    page = store.list(limit=2)
    assert [s.id for s in page.data] == ids[::-1][:2] and page.has_more
    page = store.list(limit=2, after=page.data[-1].id)
    assert [s.id for s in page.data] == ids[::-1][2:4] and page.has_more
    page = store.list(limit=2, after=page.data[-1].id)
    assert [s.id for s in page.data] == [ids[0]] and not page.has_more
    assert [s.id for s in store.list(order="asc", limit=3).data] == ids[:3]
    empty = store.list(limit=0).to_openai()
    assert empty["data"] == [] and empty["first_id"] is None and empty["has_more"]
    for kwargs, param in (({"limit": 101}, "limit"), ({"order": "up"}, "order"), ({"after": "x"}, "after")):
        with pytest.raises(InvalidRequestError) as caught:
            store.list(**kwargs)
        assert caught.value.param == param


def test_version_pagination(store: SqlSkillStore) -> None:
    skill = store.create(parts(directory()))
    for _ in range(3):
        store.create_version(skill.id, parts(directory()))
    page = store.list_versions(skill.id, limit=3)
    assert [v.version for v in page.data] == [4, 3, 2] and page.has_more
    rest = store.list_versions(skill.id, after=page.data[-1].id)
    assert [v.version for v in rest.data] == [1] and not rest.has_more
    with pytest.raises(NotFoundError):
        store.list_versions("skill_nope")


def test_delete_removes_rows_and_files(store: SqlSkillStore) -> None:
    keep = store.create(parts(directory()))
    gone = store.create(parts(directory()))
    store.create_version(gone.id, parts(directory()))
    store.delete(gone.id)
    assert not (store.skills_dir / gone.id).exists()
    assert store.db.read("SELECT * FROM skill_versions WHERE skill_id = ?", (gone.id,)) == []
    for call in (store.get, store.delete, store.list_versions):
        with pytest.raises(NotFoundError) as caught:
            call(gone.id)
        assert caught.value.param == "skill_id"
    assert store.get(keep.id) == keep


def test_unknown_skill_is_404_before_the_upload_is_read(store: SqlSkillStore) -> None:
    with pytest.raises(NotFoundError):
        store.create_version("skill_nope", [])


def test_failed_record_leaves_no_version(store: SqlSkillStore, monkeypatch: pytest.MonkeyPatch) -> None:
    skill = store.create(parts(directory()))

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_update_skill", fail)
    with pytest.raises(RuntimeError):
        store.create_version(skill.id, parts(directory()))
    assert versions_on_disk(store) == {f"{skill.id}/1"}
    assert [v.version for v in store.list_versions(skill.id).data] == [1]


def test_survives_a_reopen_and_clears_stale_staging(
    open_db: OpenDb, store: SqlSkillStore, tmp_path: Path
) -> None:
    skill = store.create(parts(directory()))
    stale = store.staging_dir / "upload-crashed"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = store.staging_dir / "upload-running"
    fresh.mkdir()
    again = SqlSkillStore(open_db(tmp_path / "data"), tmp_path / "skills")
    assert again.get(skill.id) == skill
    assert not stale.exists() and fresh.exists()


def test_install_copies_the_version_under_its_name(store: SqlSkillStore, tmp_path: Path) -> None:
    skill = store.create(parts([("s.zip", good_zip("upload-dir"))]))
    store.create_version(skill.id, parts(directory(md=skill_md("other-name"))))
    session = tmp_path / "session"
    session.mkdir()
    path = store.install(skill.id, None, session)
    assert path == session / "skills" / "my-skill"
    assert (path / "SKILL.md").read_bytes() == skill_md()
    assert (path / "scripts" / "hello.py").stat().st_mode & stat.S_IXUSR
    (path / "stale.txt").write_text("from an earlier install")
    again = store.install(skill.id, 1, session)
    assert again == path and not (path / "stale.txt").exists()
    latest = store.install(skill.id, "latest", session)
    assert latest == session / "skills" / "other-name"
    assert sorted(p.name for p in (session / "skills").iterdir()) == ["my-skill", "other-name"]


def test_install_unknown_names_the_param(store: SqlSkillStore, tmp_path: Path) -> None:
    skill = store.create(parts(directory()))
    param = "tools[0].environment.skills[1].skill_id"
    with pytest.raises(NotFoundError) as caught:
        store.install("skill_nope", None, tmp_path, param=param)
    assert caught.value.param == param and "skill_nope" in str(caught.value)
    with pytest.raises(NotFoundError) as version:
        store.install(skill.id, 9, tmp_path, param=param)
    assert version.value.param == "tools[0].environment.skills[1].version"
    for child in (store.skills_dir / skill.id / "1").iterdir():
        if child.is_file():
            child.unlink()
    (store.skills_dir / skill.id / "1" / "scripts" / "hello.py").unlink()
    (store.skills_dir / skill.id / "1" / "scripts").rmdir()
    (store.skills_dir / skill.id / "1").rmdir()
    with pytest.raises(NotFoundError, match="missing from the skills directory"):
        store.install(skill.id, None, tmp_path / "s", param=param)


def test_install_removes_planted_links_instead_of_following_them(
    store: SqlSkillStore, tmp_path: Path
) -> None:
    skill = store.create(parts(directory()))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    session = tmp_path / "session"
    session.mkdir()
    (session / "skills").symlink_to(outside)
    path = store.install(skill.id, None, session)
    assert not (session / "skills").is_symlink() and (path / "SKILL.md").is_file()
    assert tree(outside) == {"keep.txt"}
    os.rename(path, session / "skills" / "moved")
    (session / "skills" / "my-skill").symlink_to(outside)
    path = store.install(skill.id, None, session)
    assert not path.is_symlink() and tree(outside) == {"keep.txt"}
    (session / "skills" / "my-skill").rename(session / "gone")
    (session / "skills" / "my-skill").write_text("a file where the directory goes")
    assert install_tree(store.skills_dir / skill.id / "1", session, "my-skill").is_dir()


def test_versions_whose_files_are_gone_are_forgotten_on_open(
    open_db: OpenDb, store: SqlSkillStore, tmp_path: Path
) -> None:
    partly = store.create(parts(directory()))
    store.create_version(partly.id, parts(directory(md=skill_md("second"))), make_default=True)
    store.create_version(partly.id, parts(directory(md=skill_md("third"))))
    wholly = store.create(parts(directory()))
    kept = store.create(parts(directory()))
    shutil.rmtree(store.skills_dir / partly.id / "2")  # the default
    shutil.rmtree(store.skills_dir / wholly.id)
    again = SqlSkillStore(open_db(tmp_path / "data"), tmp_path / "skills")
    if again.db.shared:  # another replica may hold the files: a shared database forgets nothing
        assert {s.id for s in again.list().data} == {partly.id, wholly.id, kept.id}
        return
    assert {s.id for s in again.list().data} == {partly.id, kept.id}
    after = again.get(partly.id)
    assert (after.default_version, after.latest_version, after.name) == (3, 3, "third")
    assert [v.version for v in again.list_versions(partly.id).data] == [3, 1]


def test_default_dir_is_per_user_where_the_shared_name_is_not_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / "mistralrs-serve-skills"
    assert default_skills_dir() == shared
    shared.mkdir()
    assert default_skills_dir() == shared
    shared.rmdir()
    shared.symlink_to(tmp_path / "elsewhere")
    assert default_skills_dir() == tmp_path / f"mistralrs-serve-skills-{os.getuid()}"
