"""Which checkpoint Train.resume_path names: a folder, latest, or auto (a retried job's choice)."""

from pathlib import Path

import pytest

from mlcls_ray.config import load_config
from mlcls_ray.train.run import TrainSetupError, _resume_source


def _cfg(tmp_path: Path, resume: str):
    return load_config("test_resnet_ML", [f"Global.output={tmp_path}", f"Train.resume_path={resume}"],
                       check_paths=False)


def _checkpoint(out: Path, run: str, epoch: int) -> Path:
    folder = out / "checkpoints" / run / f"epoch_{epoch}"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"")
    return folder


def test_auto_starts_afresh_without_a_checkpoint_and_latest_refuses(tmp_path):
    assert _resume_source(_cfg(tmp_path, "auto")) is None
    with pytest.raises(TrainSetupError, match="resume_path=auto starts afresh"):
        _resume_source(_cfg(tmp_path, "latest"))


def test_auto_and_latest_pick_the_newest_runs_highest_epoch(tmp_path):
    _checkpoint(tmp_path, "train-20261201-100000-aaaaaa", 5)
    _checkpoint(tmp_path, "train-20261201-110000-bbbbbb", 1)
    newest = _checkpoint(tmp_path, "train-20261201-110000-bbbbbb", 2)
    assert _resume_source(_cfg(tmp_path, "auto")) == _resume_source(_cfg(tmp_path, "latest")) == str(newest)
