import base64
import io
import json
import math
import re

import imageio.v3 as iio
import numpy as np
import pytest

from orchestrator.metrics import MetricsLog, read_metrics
from orchestrator.report import gif_bytes, load_samples, plot_constraints, save_plots, write_report

PROMPTS = ["a red square moving left", "a blue circle moving up", "a green <triangle> & friends", "a red circle"]
SUMMARY = {
    "oracle": {
        "before": {"vq": 0.5123, "mq": 0.4411, "ta": 0.3302, "overall": 0.4279},
        "after": {"vq": 0.6789, "mq": 0.5567, "ta": 0.7011, "overall": 0.6456},
    },
    "oracle_terms": {"before": {"shape": 0.6962, "smoothness": 0.2511}, "after": {"shape": 0.5548, "smoothness": 0.2183}},
    "constraints": {"vq": {"tau": 0.6125, "final": 0.6503, "satisfied": True},
                    "ta": {"tau": 0.7250, "final": 0.7011, "satisfied": False}},
    "ledger": {"produced": 48, "consumed": 44, "dropped": 4, "lost": 0, "balanced": True},
    "throughput": {"samples_per_s": 12.5},
}


def _run_dir(tmp_path, with_after=True, steps=12):
    run = tmp_path / "run"
    with MetricsLog(run, flush_every=5, tensorboard=False) as log:
        for s in range(steps):
            row = {"step": s, "reward/vq": 0.5 + 0.01 * s, "reward/ta": 0.3 + 0.03 * s, "reward/feedback": 0.1 * s,
                   "tau/vq": 0.6125, "tau/ta": 0.725, "lambda/vq": max(0.0, 0.2 - 0.02 * s),
                   "lambda/ta": 0.05 * s, "kl": 0.001 * s, "loss/policy": -0.01 * s,
                   "throughput/samples_per_s": 12.0, "staleness/mean": 0.5}
            if s % 3:  # measured every third step only
                row["kl"] = math.nan
            log.log(row)
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    rng = np.random.default_rng(0)
    (run / "samples").mkdir()
    for which in ("before", "after") if with_after else ("before",):
        videos = rng.integers(0, 256, (4, 8, 16, 16, 3), dtype=np.uint8)
        np.savez(run / "samples" / f"{which}.npz", videos=videos, prompts=np.array(PROMPTS))
    return run


def _embedded(page: str, mime: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(rf'src="data:{mime};base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_embeds_plots_gifs_prompts_and_oracle_numbers(tmp_path):
    run = _run_dir(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    pngs, gifs = _embedded(page, "image/png"), _embedded(page, "image/gif")
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert len(gifs) == 2
    frames = iio.imread(io.BytesIO(gifs[0]), index=None, extension=".gif")
    assert frames.shape[0] == 8  # all 8 frames animate
    for p in PROMPTS[:2]:
        assert page.count(p) == 2  # before and after
    assert "a green &lt;triangle&gt; &amp; friends" in page  # escaped, not raw HTML
    for v in ("0.5123", "0.6789", "0.3302", "0.7011", "0.6456", "0.6125", "0.7250"):
        assert v in page
    assert "0.3709" in page  # ta delta after - before
    terms = page[page.index("Oracle terms"):page.index("Constraints")]  # its own table, in TERMS order
    assert terms.index("smoothness") < terms.index("shape") and "-0.1414" in terms and "-0.0328" in terms
    assert "Note:" not in page
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [
        "constraints.png", "kl_losses.png", "rewards.png", "throughput.png"]
    assert all(p.stat().st_size > 0 for p in (run / "plots").iterdir())


def test_report_without_after_samples_has_a_note(tmp_path):
    run = _run_dir(tmp_path, with_after=False, steps=3)
    page = write_report(run).read_text()
    assert "no samples/after.npz" in page
    assert len(_embedded(page, "image/gif")) == 1
    assert PROMPTS[0] in page


def test_report_of_an_empty_run_dir_is_notes_only(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "no summary.json" in page and "no metrics.parquet" in page and "no samples/before.npz" in page
    assert not _embedded(page, "image/png")


def test_plots_skip_missing_columns_and_render_png(tmp_path):
    m = {"step": np.arange(5), "lambda/ta": np.linspace(0, 1, 5), "reward/ta": np.full(5, np.nan)}
    written = save_plots(m, tmp_path)
    assert set(written) == {"constraints"}  # no reward values, no kl/loss/throughput columns
    data = written["constraints"].read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert iio.imread(written["constraints"]).shape[-1] in (3, 4)
    fig = plot_constraints(m)
    assert len(fig.axes) == 2  # one panel + its twin λ axis
    assert save_plots({"step": np.arange(3)}, tmp_path / "none") == {}


def test_metrics_round_trip_feeds_the_constraint_panel(tmp_path):
    run = _run_dir(tmp_path, steps=4)
    m = read_metrics(run)
    fig = plot_constraints(m)
    assert fig.axes[0].get_title() == "constraint ta" and len(fig.axes) == 4  # ta, vq panels, each with a λ twin
    lines = {ln.get_label(): ln.get_ydata() for a in fig.axes for ln in a.get_lines()}
    np.testing.assert_allclose(lines["λ ta"], [0.0, 0.05, 0.1, 0.15])
    np.testing.assert_allclose(lines["τ ta"], 0.725)
    np.testing.assert_allclose(lines["reward ta"], [0.3, 0.33, 0.36, 0.39])


def test_bad_samples_file_names_the_problem(tmp_path):
    np.savez(tmp_path / "bad.npz", videos=np.zeros((2, 8, 16, 16, 3), np.float32), prompts=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="expected videos uint8"):
        load_samples(tmp_path / "bad.npz")
    np.savez(tmp_path / "short.npz", videos=np.zeros((2, 8, 16, 16, 3), np.uint8), prompts=np.array(["a"]))
    with pytest.raises(ValueError, match="expected 2 prompts"):
        load_samples(tmp_path / "short.npz")
    gif = gif_bytes(np.zeros((2, 3, 4, 4, 3), np.uint8))
    assert gif.startswith(b"GIF8")
