"""Storage: the same calls on local disk and on a real S3-compatible server; atomic writes; numbered backups."""

import os

import pytest

from mlcls_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_write_read_list_exists(root):
    storage.write_text(storage.join(root, "a/b.txt"), "hello")
    storage.write_bytes(storage.join(root, "c.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a/b.txt")) == "hello"
    assert storage.list_files(root) == ["a/b.txt", "c.bin"]
    assert storage.is_dir(storage.join(root, "a")) and not storage.exists(storage.join(root, "nope.txt"))


def test_backups_are_numbered_and_never_overwritten(root):
    uri = storage.join(root, "train.txt")
    for version in ("v1", "v2", "v3"):
        storage.write_text(uri, version)
        storage.backup(uri)
    assert storage.list_files(root) == ["train.txt.bak", "train.txt.bak.1", "train.txt.bak.2"]
    assert [storage.read_text(storage.join(root, f)) for f in storage.list_files(root)] == ["v1", "v2", "v3"]
    assert storage.backup(uri) is None  # nothing left to back up


def test_missing_file_error_names_the_uri(root):
    uri = storage.join(root, "missing.txt")
    with pytest.raises(storage.StorageError, match="missing.txt: file not found"):
        storage.read_bytes(uri)


def test_local_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    with pytest.raises(TypeError):  # the write itself fails, after the temporary file was created
        storage.write_bytes(str(target), "not bytes")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")


def test_local_writes_get_the_usual_permissions(tmp_path):
    new, kept = tmp_path / "new.txt", tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    storage.write_text(str(new), "x")
    storage.write_text(str(kept), "y")
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600
    assert kept.stat().st_mode & 0o777 == 0o640
