"""toolkit bench: the sweep's arithmetic, and one real shaped sweep through a real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.core.errors import HiertrainError
from toolkit.lab.bench import (
    BenchConfig,
    LinkRate,
    markdown_table,
    plan_runs,
    reductions,
    runtime_samples,
)


def test_runtime_samples_bound_the_slowest_modes_link_time() -> None:
    cfg = BenchConfig(samples=512, max_link_s=100.0, batch=32)
    # 10 kB up + 40 kB down per sample at 1 Mbit/s: 0.4 s per sample -> 250 fit -> 224.
    assert runtime_samples(cfg, LinkRate(1.0, 1.0), 10_000, 40_000) == 224
    assert runtime_samples(cfg, LinkRate(1000.0, 1000.0), 10_000, 40_000) == 512  # capped
    assert runtime_samples(cfg, LinkRate(0.001, 0.001), 10_000, 40_000) == 64  # >= two batches


def test_plan_gives_every_mode_the_same_samples_at_a_rate() -> None:
    cfg = BenchConfig(models=("smallcnn",), links=(LinkRate(0.5, 0.5), LinkRate(50.0, 50.0)),
                      extra_codecs=("int4",), repeats=1)
    runs = plan_runs(cfg, (3, 32, 32))
    by_rate: dict = {}
    for r in runs:
        if r.schedule == "runtime":
            by_rate.setdefault(r.link.up_mbps, set()).add(r.samples)
    assert {k: len(v) for k, v in by_rate.items()} == {0.5: 1, 50.0: 1}
    assert by_rate[0.5] != by_rate[50.0]
    acc = [r for r in runs if r.schedule == "accuracy"]
    assert sorted((r.mode, r.codec) for r in acc) == [
        ("cloud", "int8"), ("ht", "int4"), ("ht", "int8"), ("split", "int8")]
    assert all(r.link is None for r in acc)


def test_reductions_and_table() -> None:
    def row(mode: str, wall: float) -> dict:
        return {"run": mode, "model": "m", "split": "s", "mode": mode, "schedule": "runtime",
                "link_up_mbps": 1.0, "link_down_mbps": 1.0, "samples": 64, "wall_s": wall,
                "data": "d", "input_shape": [3, 32, 32], "full_accuracy": 0.1,
                "edge_backend": "executorch" if mode == "ht" else "none"}

    rows = [row("ht", 25.0), row("split", 100.0), row("cloud", 50.0)]
    (e,) = reductions(rows)
    assert e["reduction_vs_split"] == 0.75 and e["reduction_vs_cloud"] == 0.5
    assert e["reduction_vs_split_g8"] is None
    table = markdown_table(rows, [e])
    assert ("| m | 3x32x32 | 1/1 | s | 64 | 1 | 25.0 | 100.0 | - | 50.0 | 75 % | - | 50 % |"
            in table)
    assert "HT edge backend: executorch" in table


def test_bad_config_is_refused() -> None:
    with pytest.raises(HiertrainError, match="mode"):
        BenchConfig(modes=("ht", "bogus")).check()
    with pytest.raises(HiertrainError, match="rates"):
        BenchConfig(links=(LinkRate(0.0, 1.0),)).check()


def test_bench_cli_refuses_unknown_model(cli, tmp_path: Path) -> None:
    r = cli("toolkit", "bench", "--models", "nope", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "nope" in r.stderr


@pytest.mark.mqtt
@pytest.mark.slow
def test_bench_runs_ht_and_split_on_a_shaped_link(cli, tmp_path: Path) -> None:
    """Two real runs (ht on ExecuTorch; split with float32 gradients) at 2 Mbit/s: rows,
    reductions, plots, from data. The cloud mode and int8 split gradients have end-to-end
    tests of their own (tests/test_modes.py); the sweep's planning of them is tested above."""
    r = cli("toolkit", "bench", "--models", "smallcnn", "--modes", "ht,split", "--rates", "2",
            "--samples", "64", "--repeats", "1",
            "--schedules", "runtime", "--data", "digits", "--broker", "embedded",
            "--latency-ms", "50", "--out", str(tmp_path),
            timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "lowbitrate.json").read_text())
    assert sorted(x["mode"] for x in rows) == ["ht", "split"]
    by = {x["mode"]: x for x in rows}
    for x in rows:
        assert x["samples"] == 64 and x["link_up_mbps"] == x["link_down_mbps"] == 2.0
        assert x["wall_s"] > 0 and x["repeat"] == 1
        assert x["batches_trained"] == 2
        assert x["predicted_s"] is not None and x["predicted_s"] > 0
        # The shaper is honest: a run cannot beat its own traffic through the link.
        assert x["wall_s"] >= (x["bytes_up"] * 8 / 2e6) * 0.95
    assert by["split"]["bytes_down"] > by["split"]["bytes_up"]  # float32 gradients back
    assert by["ht"]["bytes_down"] == 0
    assert by["ht"]["exit_accuracy"] is not None and by["split"]["exit_accuracy"] is None
    # as shipped: the ht edge ran the exported ExecuTorch program; split's edge runs torch
    assert by["ht"]["edge_backend"] == "executorch" and by["split"]["edge_backend"] == "torch"
    assert by["ht"]["et_step_s"] > 0 and "ExecuTorch" in by["ht"]["predicted_edge"]
    # split's gradients make it the slowest on this link; every figure is measured.
    assert by["split"]["wall_s"] > by["ht"]["wall_s"]
    for name in ("lowbitrate.csv", "lowbitrate_runtime.png", "lowbitrate.md",
                 "lowbitrate_reductions.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "HT vs split" in (tmp_path / "lowbitrate.md").read_text()
    (red,) = json.loads((tmp_path / "lowbitrate_reductions.json").read_text())
    assert red["reduction_vs_split"] == pytest.approx(
        1 - by["ht"]["wall_s"] / by["split"]["wall_s"], abs=1e-3)
