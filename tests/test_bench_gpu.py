"""jobs/bench_gpu.py --smoke: every part of the GPU benchmark runs on CPU with tiny sizes and prints its figure, its
baseline's and the ratio; a part that cannot be imported, or would pass the time budget, is one skipped line."""

from __future__ import annotations

import json
import re

import pytest

from jobs import bench_gpu

pytestmark = pytest.mark.usefixtures("ray_start_2_cpus")

_LINE = re.compile(r"ours (\d+\.\d+) img/s.* \| .*? (\d+\.\d+) img/s.* \| ratio (\d+\.\d+)x")


def test_smoke_run_prints_every_part_beside_its_baseline(tmp_path, capsys):
    results = bench_gpu.main(["--smoke", "--workdir", str(tmp_path), "--json", str(tmp_path / "bench.json")])
    assert not results["failed"] and not results["skipped"], (results["failed"], results["skipped"])

    out = capsys.readouterr().out
    summary = out[out.rindex("bench_gpu: "):].splitlines()  # the block printed last
    assert "CPU only" in summary[0] and summary[-1].startswith("done in ")
    for start in ("train test_resnet_ML 32px", "label test_resnet_ML 32px", "serve test_resnet_ML 32px"):
        line = next((s for s in summary if s.startswith(start)), None)
        assert line is not None, (start, summary)
        found = _LINE.search(line)
        assert found and float(found[1]) > 0 and float(found[2]) > 0, line  # the ratio may print as 0.00 on CPU

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert list(saved["train"]) == ["test_resnet_ML"]
    for kind in ("train", "label", "serve"):
        for r in saved[kind].values():
            assert r["ours"] > 0 and r["baseline"] > 0
            assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"])
    assert saved["train"]["test_resnet_ML"]["precision"] == "fp32"  # the loop's own word, read from train.log


def test_a_part_that_cannot_run_here_is_one_skipped_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench_gpu._NEEDS, "serve", ("ray.serve", "no_such_module_bench_gpu"))
    results = bench_gpu.main(["--smoke", "--part", "serve,train", "--budget-s", "0", "--workdir", str(tmp_path)])
    assert not results["failed"] and not results["serve"] and not results["train"]
    assert "make-wheels.sh --serve" in results["skipped"]["serve"]
    assert "with --part train --presets test_resnet_ML" in results["skipped"]["train test_resnet_ML"]
    out = capsys.readouterr().out
    assert "serve: skipped: no_such_module_bench_gpu cannot be imported" in out
    assert "train test_resnet_ML: skipped: --budget-s 0" in out
