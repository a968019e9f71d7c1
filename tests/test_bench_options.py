"""toolkit bench, issue 16: up/down links, backends, cloud threads, repeats and their spread,
and the runtime model priced with separate uplink and downlink rates. All fast: no run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from toolkit.core.errors import HiertrainError
from toolkit.lab import bench
from toolkit.lab.bench import (
    BenchConfig,
    LinkRate,
    aggregate,
    markdown_table,
    parse_links,
    plan_runs,
    reductions,
)
from toolkit.plan.runtime_model import Link, cloud_epoch, ht_epoch, predict, split_epoch

# ----------------------------------------------------------------------------- options


def test_links_parse_as_up_down_pairs() -> None:
    assert parse_links("0.5/0.5,2/20, 10/50,50") == (
        LinkRate(0.5, 0.5), LinkRate(2.0, 20.0), LinkRate(10.0, 50.0), LinkRate(50.0, 50.0))
    assert parse_links("2/20,2/20,2") == (LinkRate(2.0, 20.0), LinkRate(2.0, 2.0))  # deduped
    assert LinkRate(2, 20).label == "2/20" and LinkRate(0.5, 0.5).slug == "0.5M-0.5M"


@pytest.mark.parametrize("text, match", [
    ("2/20/30", "UP/DOWN"), ("fast", "UP/DOWN"), ("2/", "UP/DOWN"), ("0/10", "> 0"),
    ("2/-1", "> 0"), ("inf/2", "finite"), ("nan", "> 0"), (",", "no link"),
])
def test_bad_links_are_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(HiertrainError, match=match) as e:
        parse_links(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, match", [
    (["--links", "2/x"], "bad link"),
    (["--links", "2/20", "--rates", "2"], "not both"),
    (["--repeats", "0"], "repeats"),
    (["--cloud-threads", "64"], "cores"),
    (["--cloud-threads", "0"], "cloud threads"),
    (["--modes", "ht,nope"], "mode"),
])
def test_bench_cli_refuses_bad_options_in_one_line(cli_in_process, tmp_path, argv, match) -> None:
    r = cli_in_process("toolkit", "bench", "--models", "smallcnn", "--out", str(tmp_path), *argv)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and match in r.stderr


def test_cloud_threads_default_to_the_cores_left_and_refuse_more(monkeypatch) -> None:
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    assert BenchConfig().resolved_cloud_threads() == 1  # the edge keeps one of two
    assert BenchConfig(cloud_threads=1).resolved_cloud_threads() == 1
    with pytest.raises(HiertrainError, match="time-share"):
        BenchConfig(cloud_threads=2).resolved_cloud_threads()
    monkeypatch.setattr(bench, "usable_cores", lambda: 8)
    assert BenchConfig().resolved_cloud_threads() == 7
    monkeypatch.setattr(bench, "usable_cores", lambda: 1)
    assert BenchConfig().resolved_cloud_threads() == 1  # nothing better to give


def test_bad_backend_lowering_and_shape_are_refused() -> None:
    for cfg, match in ((BenchConfig(edge_backend="tflite"), "edge backend"),
                       (BenchConfig(lowering="fast"), "lowering"),
                       (BenchConfig(input_shape=(3, 0, 224)), "C,H,W")):
        with pytest.raises(HiertrainError, match=match):
            cfg.check()


# ----------------------------------------------------------------------------- the sweep


def test_runs_carry_backend_links_and_repeat_and_repeat_whole_sweeps() -> None:
    cfg = BenchConfig(models=("smallcnn",), links=parse_links("2/20,0.5/0.5"), repeats=3,
                      schedules=("runtime",))
    runs = plan_runs(cfg, (1, 32, 32))
    assert len(runs) == 3 * 2 * 3 and len({r.name for r in runs}) == len(runs)
    # every point once per repeat before the next repeat; slow links first within it
    assert [r.repeat for r in runs] == [1] * 6 + [2] * 6 + [3] * 6
    assert [r.link.label for r in runs[:6]] == ["0.5/0.5"] * 3 + ["2/20"] * 3
    assert {r.mode: r.edge_backend for r in runs} == {
        "ht": "executorch", "split": "torch", "cloud": "none"}
    assert runs[0].name == "runtime-smallcnn-32x32-block1-ht-0.5M-0.5M-int8-executorch-r1"
    torch_cfg = BenchConfig(models=("smallcnn",), edge_backend="torch", repeats=1,
                            schedules=("runtime",), modes=("ht",))
    assert {r.edge_backend for r in plan_runs(torch_cfg, (1, 32, 32))} == {"torch"}


def test_camera_frames_bound_samples_by_the_image_upload() -> None:
    """At 224x224 the cloud mode's frame (150 KB) outweighs ht's cut: the runtime
    schedule's sample count is bounded by the image upload."""
    cfg = BenchConfig(models=("smallcnn",), links=parse_links("2/20"), repeats=1, samples=512,
                      max_link_s=60.0, schedules=("runtime",), modes=("ht", "cloud"))
    (n,) = {r.samples for r in plan_runs(cfg, (3, 224, 224))}
    assert n == int(60.0 / (3 * 224 * 224 * 8 / 2e6)) // 32 * 32  # 96
    no_cloud = BenchConfig(models=("smallcnn",), links=parse_links("2/20"), repeats=1,
                           modes=("ht",), samples=512, max_link_s=60.0, schedules=("runtime",))
    assert {r.samples for r in plan_runs(no_cloud, (3, 224, 224))} == {512}


def test_planned_splits_follow_the_chooser_per_link() -> None:
    cfg = BenchConfig(models=("smallcnn",), links=parse_links("0.5/0.5,50/50"), repeats=1,
                      modes=("ht",), schedules=("runtime",), splits={"smallcnn": "plan"})
    with pytest.raises(HiertrainError, match="planner"):
        plan_runs(cfg, (1, 32, 32))  # the static chooser cannot plan

    def choose(model: str, link: LinkRate | None) -> tuple[str, str]:
        return ("block2" if link.up_mbps < 1 else "block1"), f"plan at {link.label}"

    runs = plan_runs(cfg, (1, 32, 32), choose)
    assert [(r.split, r.split_source) for r in runs] == [
        ("block2", "plan at 0.5/0.5"), ("block1", "plan at 50/50")]


# ----------------------------------------------------------------------------- aggregation


def _row(mode: str, rep: int, wall: float, link: str = "2/20", grad: str | None = None
         ) -> dict:
    up, down = (float(v) for v in link.split("/"))
    return {"run": f"{mode}-{link}-{grad}-r{rep}", "model": "m", "split": "s", "mode": mode,
            "grad_codec": grad, "schedule": "runtime", "repeat": rep, "link": link,
            "link_up_mbps": up, "link_down_mbps": down, "latency_ms": 20.0, "codec": "int8",
            "samples": 64, "epochs": 1, "wall_s": wall, "data": "d",
            "input_shape": [3, 32, 32], "full_accuracy": 0.1, "bytes_per_sample_up": 100.0,
            "edge_backend": {"ht": "executorch", "split": "torch"}.get(mode, "none"),
            "predicted_s": wall / 2}


def test_repeats_aggregate_to_mean_std_min_max_per_point() -> None:
    rows = [_row("ht", i + 1, w) for i, w in enumerate((10.0, 12.0, 14.0))]
    rows += [_row("split", i + 1, w) for i, w in enumerate((40.0, 40.0, 40.0))]
    rows += [_row("ht", 1, 99.0, link="2/2")]  # another point
    pts = {(p["mode"], p["link"]): p for p in aggregate(rows)}
    ht = pts["ht", "2/20"]
    assert (ht["repeats"], ht["wall_s_mean"], ht["wall_s_std"], ht["wall_s_min"],
            ht["wall_s_max"]) == (3, 12.0, 2.0, 10.0, 14.0)
    assert ht["predicted_s"] == 6.0 and len(ht["runs"]) == 3
    assert pts["split", "2/20"]["wall_s_std"] == 0.0
    assert pts["ht", "2/2"]["repeats"] == 1 and pts["ht", "2/2"]["wall_s_std"] == 0.0
    red = {e["link"]: e for e in reductions(rows)}
    assert red["2/20"]["reduction_vs_split"] == pytest.approx(0.7)  # 1 - 12 / 40, the means
    assert red["2/20"]["ht_s_std"] == 2.0 and red["2/20"]["repeats"] == 3
    assert red["2/2"]["split_s"] is None
    table = markdown_table(rows, list(red.values()))
    assert "| m | 3x32x32 | 2/20 | s | 64 | 3 | 12.0 ± 2.0 | 40.0 | - | - | 70 % |" in table
    assert "| m | 3x32x32 | 2/20 | ht | executorch | 64 | 3 | 12.0 | 2.00 | 10.0 | 14.0 | 6.0 |" \
        in table


def test_rows_from_before_up_down_links_still_aggregate() -> None:
    old = {"run": "x", "model": "m", "split": "s", "mode": "ht", "schedule": "runtime",
           "link_mbps": 2.0, "samples": 64, "wall_s": 5.0, "data": "d", "full_accuracy": 0.1}
    (p,) = aggregate([old])
    assert (p["link"], p["link_up_mbps"], p["link_down_mbps"]) == ("2/2", 2.0, 2.0)


# ----------------------------------------------------------------------------- pricing


def test_asymmetric_link_prices_each_direction_with_its_own_rate() -> None:
    up_limited = Link(kbps=2000, latency_ms=20, down_kbps=20000)
    sym = Link(kbps=2000, latency_ms=20)
    # 10 kB up, 40 kB down per batch: 40 ms up at 2 Mbit/s; 16 ms down at 20 (160 ms at 2)
    sl = split_epoch(10, 0.1, 0.1, 10_000, 0.2, 40_000, up_limited)
    assert sl.per_batch["uplink_s"] == pytest.approx(0.04)
    assert sl.per_batch["downlink_s"] == pytest.approx(0.016)
    assert sl.epoch_s == pytest.approx(10 * (0.2 + 0.04 + 0.2 + 0.016 + 0.04))
    assert split_epoch(10, 0.1, 0.1, 10_000, 0.2, 40_000, sym).per_batch["downlink_s"] == \
        pytest.approx(0.16)
    # ht and cloud send nothing down: the downlink rate does not change them
    for f in (lambda ln: ht_epoch(10, 0.2, 10_000, 0.2, ln),
              lambda ln: cloud_epoch(10, 10_000, 0.2, ln)):
        assert f(up_limited).epoch_s == f(sym).epoch_s
    assert up_limited.to_dict() == {"kbps": 2000, "latency_ms": 20, "down_kbps": 20000}


def _fake_profile() -> SimpleNamespace:
    times = SimpleNamespace(cut_shape=(16, 16, 16), ht_edge_s=0.010, ht_cloud_s=0.020,
                            split_edge_fwd_s=0.004, split_edge_bwd_s=0.005, split_cloud_s=0.022)
    return SimpleNamespace(batch=32, input_shape=(1, 32, 32), full_step_s=0.03,
                           split_times=lambda split, bits=8: times,
                           exits={"block1": SimpleNamespace(quantize_s=0.001)})


class _Fixed:
    def get(self, model, shape, threads):
        return _fake_profile()


def test_bench_prediction_uses_up_and_down_and_the_executorch_step() -> None:
    base = _row("ht", 1, 1.0) | {"split": "block1", "model": "smallcnn", "samples": 320,
                                  "input_shape": [1, 32, 32], "cloud_threads": 1}
    ht_et = bench._predict(base | {"et_step_s": 0.039}, _Fixed())
    ht_eager = bench._predict(base | {"edge_backend": "torch"}, _Fixed())
    ht_unmeasured = bench._predict(base | {"et_step_s": None}, _Fixed())
    assert "ExecuTorch step measured" in ht_et["predicted_edge"]
    assert ht_eager["predicted_edge"] == "eager profile"
    assert "no ExecuTorch step" in ht_unmeasured["predicted_edge"]
    link = Link(2000, 20, down_kbps=20000)
    eager = predict("ht", _fake_profile(), "block1", link, 320)
    assert ht_eager["predicted_s"] == round(eager.epoch_s, 3)
    # the ExecuTorch edge step (39 + 1 ms) replaces the eager one (10 ms)
    et = predict("ht", _fake_profile(), "block1", link, 320, edge_speed=0.010 / 0.040)
    assert ht_et["predicted_s"] == round(et.epoch_s, 3) and et.per_batch["edge_s"] == \
        pytest.approx(0.040)
    split_row = base | {"mode": "split", "grad_codec": "float32", "edge_backend": "torch"}
    fast_down = bench._predict(split_row, _Fixed())["predicted_s"]
    slow_down = bench._predict(split_row | {"link_down_mbps": 2.0}, _Fixed())["predicted_s"]
    assert slow_down > fast_down  # split learning's gradients come down the downlink
    assert bench._predict(base | {"schedule": "accuracy"}, _Fixed())["predicted_s"] is None


def test_executorch_thread_count_is_validated() -> None:
    from toolkit.core import et_program

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            et_program.set_threads(bad)  # type: ignore[arg-type]


def test_frames_are_uint8_at_the_asked_shape_so_images_travel_one_byte_a_pixel(tmp_path) -> None:
    from toolkit.core.data.datasets import load_dataset
    from toolkit.core.protocol.codec import IMAGE_CODEC

    cfg = BenchConfig(samples=32, eval_limit=8, schedules=("runtime",))
    base = bench.DataSource("digits", (1, 32, 32), (0.3,), (0.37,), "digits")
    src = bench._frames(cfg, base, (3, 40, 48), tmp_path)
    assert src.shape == (3, 40, 48) and len(src.mean) == len(src.std) == 3
    assert "uint8 frames" in src.name and "made for this run" in src.name
    train = load_dataset(src.source, "train")
    assert tuple(train.x.shape) == (32, 3, 40, 48) and len(load_dataset(src.source, "test")) == 8
    assert IMAGE_CODEC.on_grid(train.x[:4])  # on the uint8 grid: no float32 upload
    assert bench._frames(cfg, base, (3, 40, 48), tmp_path) == src  # written once, reused
