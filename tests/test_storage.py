"""Storage: the same calls on local disk and on a real S3-compatible server; atomic writes; numbered backups."""

import os
import pickle

import pytest

from mlcls_ray import storage
from tests.helpers import failing_move_onto


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


@pytest.mark.parametrize("base", ["s3://bucket/prefix", "/data/set"])
def test_an_absolute_part_is_refused_not_allowed_to_replace_the_base(base):
    with pytest.raises(storage.StorageError, match="cannot join an absolute path"):
        storage.join(base, "/x")
    assert storage.join(base, "a/b.txt") == f"{base}/a/b.txt"


def test_a_bucket_outside_us_east_1_is_found_without_aws_region(s3_server, monkeypatch):
    import boto3

    boto3.client("s3").create_bucket(Bucket="eu-bucket", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    fs, _ = storage.resolve("s3://eu-bucket/data")
    assert fs.region == "eu-west-1"
    storage.write_text("s3://eu-bucket/data/x.txt", "hello")
    assert storage.read_text("s3://eu-bucket/data/x.txt") == "hello"


def test_a_local_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    storage.write_text(str(tmp_path / "result.json"), "{}")
    assert events == ["fsync", "replace"]


def test_streamed_output_appears_whole_or_not_at_all(root):
    uri = storage.join(root, "big.bin")
    with storage.open_output(uri) as f:
        for i in range(10):
            f.write(bytes([i]) * 100_000)
    assert storage.read_bytes(uri) == b"".join(bytes([i]) * 100_000 for i in range(10))
    with pytest.raises(RuntimeError), storage.open_output(uri) as f:
        f.write(b"partial")
        raise RuntimeError("the writer failed half way")
    assert storage.read_bytes(uri)[:100_000] == bytes(100_000)  # the old file, untouched
    assert storage.list_files(root) == ["big.bin"]  # and no temporary file left behind


def test_replacing_swaps_every_file_or_none(root, monkeypatch):
    targets = [storage.join(root, name) for name in ("label.txt", "train.txt", "val.txt")]
    for t in targets:
        storage.write_text(t, "old " + t)
    real_move = storage._move
    monkeypatch.setattr(storage, "_move", failing_move_onto("val.txt"))
    with pytest.raises(storage.StorageError, match="every file was put back as it was"):
        with storage.replacing(targets) as staged:
            for t in targets:
                storage.write_text(staged[t], "new " + t)
    assert [storage.read_text(t) for t in targets] == ["old " + t for t in targets]
    assert storage.list_files(root) == ["label.txt", "train.txt", "val.txt"]  # no backups or staging left over
    monkeypatch.setattr(storage, "_move", real_move)
    with storage.replacing(targets) as staged:
        for t in targets:
            storage.write_text(staged[t], ("old " if t.endswith("label.txt") else "new ") + t)
    assert [storage.read_text(t) for t in targets] == ["old " + targets[0], "new " + targets[1], "new " + targets[2]]
    assert storage.list_files(root) == ["label.txt", "train.txt", "train.txt.bak", "val.txt", "val.txt.bak"]


def test_no_credential_leaves_the_process(s3_bucket, monkeypatch):
    """What Ray hands its tasks, a pickled filesystem and label's runtime_env settings, holds the endpoint but no
    credential: each worker takes its own from its node's chain, which renews session tokens."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sec-71b2e0")  # moto takes any key
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-3f9a1c")
    fs, path = storage.resolve(f"{s3_bucket}/x.txt")
    shipped = pickle.dumps(fs)
    assert b"sec-71b2e0" not in shipped and b"tok-3f9a1c" not in shipped
    assert os.environ["AWS_ENDPOINT_URL"].split("//")[1].encode() in shipped
    assert storage.aws_settings() == {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_REGION": "us-east-1"}
    storage.write_text(f"{s3_bucket}/x.txt", "written with the process's own chain")
    assert pickle.loads(shipped).open_input_stream(path).read() == b"written with the process's own chain"
