"""The run report: one self-contained `report.html` (plots and GIFs embedded as base64) from a run directory.

Reads `metrics.parquet` (orchestrator.metrics), `summary.json` and `samples/before.npz` / `samples/after.npz`
(`videos` uint8 [N, T, H, W, 3], `prompts` str [N]); every piece is optional and a missing one becomes a note.
`long_eval.json` (`videorl eval --frames N` on the run's final policy) adds the quality-vs-window-position plot.
Plots also land as PNG in `run_dir/plots/`. Matplotlib is used through `Figure` only (Agg, no pyplot state).

summary.json, as read here (extra keys are shown in an "other" table):
  {"oracle": {"before": {"vq", "mq", "ta", "overall"}, "after": {...}}, "oracle_terms": {"before": {term: x}, ...},
   "constraints": {name: {"tau", "final", "satisfied"}}, "ledger": {counter: n}, "throughput": {name: value}}
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from matplotlib.figure import Figure

from orchestrator.media import video_grid
from orchestrator.metrics import METRICS_FILE, read_metrics
from rewards.oracle import TERMS

ORACLE_DIMS = ("vq", "mq", "ta", "overall")
CONSTRAINT_KEYS = ("tau", "final", "satisfied")
GIF_COLS = 4  # clips per row in the sample grids


# ---------------------------------------------------------------- plots

def _present(metrics: dict[str, np.ndarray], prefix: str) -> list[str]:
    """Columns named `prefix` or starting with `prefix` that hold at least one finite value, sorted."""
    return sorted(
        k for k in metrics
        if k != "step" and (k == prefix.rstrip("/") or k.startswith(prefix)) and np.isfinite(metrics[k]).any()
    )


def _line(ax, metrics: dict[str, np.ndarray], name: str, label: str | None = None, **kw) -> None:
    """Plot a column against step over its measured (finite) points only, so sparse metrics still draw a line."""
    y = metrics[name]
    ok = np.isfinite(y)
    ax.plot(metrics["step"][ok], y[ok], label=label or name, **kw)


def _panels(n: int, width: float = 4.2, height: float = 3.0, ncols: int = 3) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def plot_rewards(metrics: dict[str, np.ndarray]) -> Figure | None:
    """Every `reward/*` column over learner steps on one axis."""
    names = _present(metrics, "reward/")
    if not names:
        return None
    fig, (ax,) = _panels(1, width=6.5, height=3.5)
    for n in names:
        _line(ax, metrics, n, n.removeprefix("reward/"))
    ax.set(title="rewards per dimension (batch mean)", xlabel="learner step", ylabel="reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_constraints(metrics: dict[str, np.ndarray]) -> Figure | None:
    """One panel per constraint c: `reward/c` against the threshold `tau/c`, and λ_c (`lambda/c`) on a twin axis."""
    names = sorted({k.split("/", 1)[1] for k in _present(metrics, "lambda/") + _present(metrics, "tau/")})
    if not names:
        return None
    fig, axes = _panels(len(names))
    for c, ax in zip(names, axes):
        handles = []
        if f"reward/{c}" in metrics and np.isfinite(metrics[f"reward/{c}"]).any():
            _line(ax, metrics, f"reward/{c}", f"reward {c}", color="tab:blue")
        if f"tau/{c}" in metrics and np.isfinite(metrics[f"tau/{c}"]).any():
            _line(ax, metrics, f"tau/{c}", f"τ {c}", color="tab:red", linestyle="--")
        ax.set(title=f"constraint {c}", xlabel="learner step", ylabel="reward")
        ax.grid(alpha=0.3)
        handles += ax.get_legend_handles_labels()[0]
        if f"lambda/{c}" in metrics and np.isfinite(metrics[f"lambda/{c}"]).any():
            ax2 = ax.twinx()
            _line(ax2, metrics, f"lambda/{c}", f"λ {c}", color="tab:green")
            ax2.set_ylabel("λ", color="tab:green")
            handles += ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="best")
    return fig


def _panel_groups(metrics: dict[str, np.ndarray], groups: list[tuple[str, str]]) -> Figure | None:
    """One panel per (prefix, title) that has columns, each column a line."""
    present = [(p, t, _present(metrics, p)) for p, t in groups]
    present = [g for g in present if g[2]]
    if not present:
        return None
    fig, axes = _panels(len(present))
    for (prefix, title, names), ax in zip(present, axes):
        for n in names:
            _line(ax, metrics, n)
        ax.set(title=title, xlabel="learner step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_kl_losses(metrics: dict[str, np.ndarray]) -> Figure | None:
    """`kl` / `kl/*` and `loss/*` columns, one panel each."""
    return _panel_groups(metrics, [("kl/", "KL"), ("loss/", "losses")])


def plot_throughput(metrics: dict[str, np.ndarray]) -> Figure | None:
    """`throughput/*`, `staleness/*` and `queue/*` columns, one panel each."""
    return _panel_groups(
        metrics, [("throughput/", "throughput"), ("staleness/", "staleness (versions)"), ("queue/", "queue depth")]
    )


def plot_curriculum(metrics: dict[str, np.ndarray]) -> Figure | None:
    """Self-paced curriculum: `curriculum/w_*` channel weights and the `curriculum/competence` they follow."""
    return _panel_groups(metrics, [("curriculum/w_", "channel weights"), ("curriculum/competence", "competence")])


PLOTS = (  # file stem, figure maker, caption
    ("rewards", plot_rewards, "Rewards per dimension"),
    ("constraints", plot_constraints, "Constraints: reward vs threshold τ, and the Lagrange multiplier λ(t)"),
    ("kl_losses", plot_kl_losses, "KL and losses"),
    ("curriculum", plot_curriculum, "Self-paced curriculum: channel weights follow the competence (EMA of batch quality)"),
    ("throughput", plot_throughput, "Throughput, staleness and queues"),
)


def save_plots(metrics: dict[str, np.ndarray], out_dir: str | Path) -> dict[str, Path]:
    """Render every plot that has data to `out_dir/<stem>.png`; returns {stem: path} (missing columns are skipped)."""
    if "step" not in metrics:
        raise ValueError(f"metrics need a 'step' column, got {sorted(metrics)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, make, _ in PLOTS:
        fig = make(metrics)
        if fig is not None:
            written[stem] = out_dir / f"{stem}.png"
            fig.savefig(written[stem], dpi=90)
    return written


# ---------------------------------------------------------------- samples

def load_samples(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a samples npz: `videos` uint8 [N, T, H, W, 3] and `prompts` [N] str."""
    with np.load(path, allow_pickle=False) as z:
        if "videos" not in z or "prompts" not in z:
            raise ValueError(f"{path}: expected arrays 'videos' and 'prompts', got {sorted(z.files)}")
        videos, prompts = z["videos"], [str(p) for p in z["prompts"]]
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{path}: expected videos uint8 [N, T, H, W, 3], got {videos.dtype} {tuple(videos.shape)}")
    if len(prompts) != len(videos):
        raise ValueError(f"{path}: expected {len(videos)} prompts (one per video), got {len(prompts)}")
    return videos, prompts


def gif_bytes(videos: np.ndarray, ncols: int = GIF_COLS, fps: int = 4, scale: int = 4) -> bytes:
    """A looping GIF of the clips [N, T, H, W, 3] uint8 tiled row-major in `ncols` columns."""
    return iio.imwrite("<bytes>", video_grid(videos, ncols, scale), extension=".gif", duration=1000 / fps, loop=0)


# ---------------------------------------------------------------- html

def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _flat(d: dict, prefix: str = "") -> list[list]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", v])
    return rows


def _before_after(title: str, table: dict, order: tuple[str, ...], label: str) -> str:
    """A before / after / Δ table of {"before": {name: x}, "after": {...}}; `order` first, other names after."""
    before, after = table.get("before") or {}, table.get("after") or {}
    names = [d for d in order if d in before or d in after]
    names += sorted((set(before) | set(after)) - set(names))
    rows = []
    for d in names:
        b, a = before.get(d), after.get(d)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append([d, b, a, delta])
    return f"<h3>{title}</h3>" + _table([label, "before", "after", "Δ"], rows)


def _summary_html(summary: dict) -> str:
    parts = []
    if summary.get("oracle"):
        parts.append(_before_after("Oracle (held-out prompts)", summary["oracle"], ORACLE_DIMS, "dimension"))
    if summary.get("oracle_terms"):  # which of each dimension's three terms moved
        parts.append(_before_after("Oracle terms (held-out prompts)", summary["oracle_terms"],
                                   tuple(t for names in TERMS.values() for t in names), "term"))
    constraints = summary.get("constraints") or {}
    if constraints:
        extra = sorted({k for c in constraints.values() for k in c} - set(CONSTRAINT_KEYS))
        keys = list(CONSTRAINT_KEYS) + extra
        rows = [[name] + [c.get(k) for k in keys] for name, c in constraints.items()]
        parts.append("<h3>Constraints</h3>" + _table(["constraint", "τ", "final", "satisfied"] + extra, rows))
    for key, title in (("ledger", "Ledger"), ("throughput", "Throughput")):
        if summary.get(key):
            parts.append(f"<h3>{title}</h3>" + _table(["name", "value"], _flat(summary[key])))
    other = {k: v for k, v in summary.items() if k not in ("oracle", "oracle_terms", "constraints", "ledger", "throughput")}
    if other:
        parts.append("<h3>Other</h3>" + _table(["name", "value"], _flat(other)))
    return "".join(parts)


def _img(mime: str, data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.note{color:#a60}.samples{display:flex;gap:2em;flex-wrap:wrap}.samples img{image-rendering:pixelated}
ol{font-size:90%}"""


def write_report(run_dir: str | Path) -> Path:
    """Build `run_dir/report.html` (self-contained) and `run_dir/plots/*.png`; returns the report path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    notes: list[str] = []
    body: list[str] = []

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        body.append("<h2>Summary</h2>" + _summary_html(json.loads(summary_path.read_text())))
    else:
        notes.append("no summary.json (the run has not finished its final evaluation)")

    if (run_dir / METRICS_FILE).exists():
        plots = save_plots(read_metrics(run_dir), run_dir / "plots")
        body.append("<h2>Training curves</h2>")
        for stem, _, caption in PLOTS:
            if stem in plots:
                body.append(f"<h3>{html.escape(caption)}</h3>" + _img("image/png", plots[stem].read_bytes(), caption))
        if not plots:
            notes.append("metrics.parquet has no reward/, lambda/, tau/, kl, loss/, throughput/ or staleness/ columns")
    else:
        notes.append(f"no {METRICS_FILE}: no training curves")

    long_eval = run_dir / "long_eval.json"  # written by `videorl eval --frames N --checkpoint RUN/final`
    if long_eval.exists():
        from orchestrator.evaluation import plot_long_eval

        data = json.loads(long_eval.read_text())
        (run_dir / "plots").mkdir(exist_ok=True)
        plot_long_eval(data).savefig(run_dir / "plots" / "long_eval.png", dpi=90)
        caption = f"Long videos: quality per {data['window']}-frame window of {data['frames']} frames"
        body.append(f"<h2>{html.escape(caption)}</h2>"
                    + _img("image/png", (run_dir / "plots" / "long_eval.png").read_bytes(), caption))

    cells = []
    for which in ("before", "after"):
        path = run_dir / "samples" / f"{which}.npz"
        if not path.exists():
            notes.append(f"no samples/{which}.npz: no {which}-training samples")
            continue
        videos, prompts = load_samples(path)
        gif = gif_bytes(videos)
        (run_dir / "plots").mkdir(exist_ok=True)
        (run_dir / "plots" / f"samples_{which}.gif").write_bytes(gif)
        items = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
        cells.append(f"<div><h3>{which} RL</h3>{_img('image/gif', gif, which + ' samples')}"
                     f"<p>prompts, row by row ({GIF_COLS} per row):</p><ol>{items}</ol></div>")
    if cells:
        body.append('<h2>Samples</h2><div class="samples">' + "".join(cells) + "</div>")

    note_html = "".join(f'<p class="note">Note: {html.escape(n)}</p>' for n in notes)
    title = f"videorl run report: {html.escape(run_dir.name)}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1>{note_html}{''.join(body)}</body></html>")
    out = run_dir / "report.html"
    tmp = out.with_name(f".report.html.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
