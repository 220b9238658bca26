"""The study report: one self-contained HTML page from a batch's results table (plots are matplotlib PNGs
embedded as ``data:`` URLs, so the page can be mailed or archived alone).

Sections (element ids in brackets, for scripts and tests): summary [``summary``]; Dice per label [``dice-table``,
plot ``plot-dice``]; volume distributions [``plot-volumes``]; Dice grouped by each grouping column with counts,
the bias analysis [``group-<column>`` tables, ``plot-group-<column>``]; time and energy per study
[``plot-time-energy``]; the worst studies by foreground Dice with overlay thumbnails [``worst``]; failed
studies with their errors [``failed``]. Numbers in the tables are the table's values rounded for display
(Dice 3 decimals). Dice is measured against each study's reference mask; whether those are expert labels is
a property of the cohort, stated by whoever runs the batch.
"""
from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..outputs import write_text
from .results import DICE, FOREGROUND, GROUP, VOLUME, ResultsTable

N_WORST = 5


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a ``data:`` URL (the figure is closed)."""
    plt = _plt()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(element_id: str, url: str, alt: str) -> str:
    return f'<img id="{html.escape(element_id)}" src="{url}" alt="{html.escape(alt)}">'


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _values(frame, column: str) -> np.ndarray:
    return frame[column].dropna().to_numpy(dtype=float) if column in frame.columns else np.zeros(0)


def _boxplot(ax, data: list[np.ndarray], names: list[str]) -> None:
    """Box plot with every study as a dot (small cohorts: the dots are the data)."""
    shown = [d if d.size else np.array([np.nan]) for d in data]
    ax.boxplot(shown, showfliers=False)
    rng = np.random.default_rng(0)
    for n, d in enumerate(data, start=1):
        ax.plot(n + rng.uniform(-0.12, 0.12, d.size), d, "o", ms=4, alpha=0.7, color="#3a7bd5")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if len(names) > 3 else 0,
                  ha="right" if len(names) > 3 else "center", fontsize=8)


def _table(element_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{html.escape(element_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------------------ plots
def dice_plot(results: ResultsTable) -> Optional[str]:
    names = results.columns(DICE)
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(names) + 2), 4), layout="constrained")
    data = [_values(results.done, DICE + n) for n in names]
    _boxplot(ax, data, [f"{n}\n(n={d.size})" for n, d in zip(names, data)])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per label (each dot a study)")
    return _png(fig)


def volume_plot(results: ResultsTable) -> Optional[str]:
    names = results.columns(VOLUME)
    columns = [VOLUME + n for n in names] + (["total_ml"] if "total_ml" in results.frame.columns else [])
    labels = names + ["total"]
    data = [_values(results.done, c) for c in columns]
    if not any(d.size for d in data):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(columns) + 2), 4), layout="constrained")
    _boxplot(ax, data, [f"{n}\n(n={d.size})" for n, d in zip(labels, data)])
    ax.set_ylabel("volume (ml)")
    ax.set_title("Segmented volume per label")
    return _png(fig)


def group_stats(results: ResultsTable, group: str, metric: str = DICE + FOREGROUND) -> list[tuple[str, np.ndarray]]:
    """``[(group value, Dice values of its done studies)]`` sorted by value (empty cells: ``"(none)"``)."""
    done = results.done
    if metric not in done.columns:
        return []
    keys = done[GROUP + group].fillna("").astype(str).replace("", "(none)")
    return [(value, done.loc[keys == value, metric].dropna().to_numpy(dtype=float))
            for value in sorted(keys.unique())]


def group_plot(results: ResultsTable, group: str) -> Optional[str]:
    stats = group_stats(results, group)
    if not stats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(stats) + 2), 3.8), layout="constrained")
    _boxplot(ax, [d for _, d in stats], [f"{v}\n(n={d.size})" for v, d in stats])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice (foreground)")
    ax.set_title(f"Dice by {group}")
    return _png(fig)


def time_energy_plot(results: ResultsTable) -> Optional[str]:
    frame = results.frame
    if frame.empty:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8.0, 0.45 * len(frame) + 5), 3.8), layout="constrained")
    cases = frame["case"].astype(str).tolist()
    colours = ["#3a7bd5" if s == "done" else "#d9534f" for s in frame["status"]]
    x = np.arange(len(cases))
    a.bar(x, frame["seconds"].fillna(0).to_numpy(dtype=float), color=colours)
    a.set_ylabel("seconds per study")
    a.set_title("Time per study (red: failed)")
    wh = frame["energy_kwh"].to_numpy(dtype=float) * 1000.0 if "energy_kwh" in frame.columns else np.zeros(len(x))
    b.bar(x, np.nan_to_num(wh), color=colours)
    b.set_ylabel("Wh per study")
    b.set_title("Energy per study (CodeCarbon)")
    for ax in (a, b):
        ax.set_xticks(x, cases, rotation=60, ha="right", fontsize=7)
    return _png(fig)


def thumbnail(results: ResultsTable, row) -> Optional[str]:
    """Overlay thumbnail of one study (image, label map, reference outline), or ``None`` if unavailable."""
    from ..labels import read_labelmap
    from ..viz import overlay_png
    from ..volume import read_volume, resample_to

    image_path, labels_path = results.path(row.get("image")), results.path(row.get("labels"))
    if image_path is None or labels_path is None or not labels_path.exists():
        return None
    try:
        image = read_volume(image_path)
        labelmap = read_labelmap(labels_path)
        reference = None
        ref_path = results.path(row.get("reference"))
        if ref_path is not None:
            ref = read_volume(ref_path, kind="label")
            if not ref.geometry.same_as(image.geometry):
                ref = resample_to(ref, image.geometry, "nearest")
            reference = ref.array
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "thumb.png"
            overlay_png(image, labelmap, path, reference=reference, title=str(row.get("case")), dpi=60)
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    except (InputError, OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ page
def build_html(results: ResultsTable, title: str = "MRISegAssist study report", n_worst: int = N_WORST) -> str:
    """The report page (see the module docstring)."""
    frame, done, failed = results.frame, results.done, results.failed
    groups = results.columns(GROUP)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>Results table: {html.escape(str(results.source))}; generated "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}. <b>Not for clinical use.</b> Dice is "
             f"measured against each study's reference mask (expert labels only if the cohort's references "
             f"are).</p>"]
    seconds = _values(frame, "seconds")
    energy = _values(frame, "energy_kwh")
    emissions = _values(frame, "emissions_kg")
    method = next((str(m) for m in frame.get("energy_method", []) if isinstance(m, str) and m), "not measured")
    summary = [["studies", str(len(frame))], ["done", str(len(done))], ["failed", str(len(failed))],
               ["time, all studies (s)", _num(seconds.sum(), 1)],
               ["time per study, median (s)", _num(np.median(seconds) if seconds.size else None, 1)],
               ["energy, all studies (Wh)", _num(energy.sum() * 1000 if energy.size else None, 3)],
               ["emissions, all studies (g CO2e)", _num(emissions.sum() * 1000 if emissions.size else None, 3)],
               ["energy measured by", html.escape(method)]]
    parts += ["<h2>Summary</h2>", _table("summary", ["", "value"], summary)]

    names = results.columns(DICE)
    if names:
        rows = []
        for n in names:
            v = _values(done, DICE + n)
            rows.append([html.escape(n), str(v.size), _num(v.mean() if v.size else None),
                         _num(np.median(v) if v.size else None), _num(v.min() if v.size else None),
                         _num(v.max() if v.size else None)])
        parts += ["<h2>Dice per label</h2>", _table("dice-table", ["label", "n", "mean", "median", "min", "max"],
                                                     rows)]
        plot = dice_plot(results)
        if plot:
            parts.append(_img("plot-dice", plot, "Dice per label"))
    else:
        parts.append("<p>No reference masks were given: no Dice.</p>")
    plot = volume_plot(results)
    if plot:
        parts += ["<h2>Volumes</h2>", _img("plot-volumes", plot, "volume distributions")]

    if groups and DICE + FOREGROUND in frame.columns:
        parts.append("<h2>Dice by group (bias analysis)</h2>")
        for g in groups:
            stats = group_stats(results, g)
            rows = [[html.escape(v), str(d.size), _num(d.mean() if d.size else None),
                     _num(np.median(d) if d.size else None)] for v, d in stats]
            parts += [f"<h3>{html.escape(g)}</h3>",
                      _table(f"group-{g}", [g, "n", "mean Dice", "median Dice"], rows)]
            plot = group_plot(results, g)
            if plot:
                parts.append(_img(f"plot-group-{g}", plot, f"Dice by {g}"))
    plot = time_energy_plot(results)
    if plot:
        parts += ["<h2>Time and energy per study</h2>", _img("plot-time-energy", plot, "time and energy")]

    if DICE + FOREGROUND in frame.columns and len(done):
        worst = done.dropna(subset=[DICE + FOREGROUND]).sort_values(DICE + FOREGROUND).head(n_worst)
        rows = []
        for _, row in worst.iterrows():
            thumb = thumbnail(results, row.to_dict())
            cell = _img(f"thumb-{row['case']}", thumb, f"overlay of {row['case']}") if thumb else "n/a"
            rows.append([html.escape(str(row["case"])), _num(row[DICE + FOREGROUND]),
                         _num(row.get("total_ml"), 2), html.escape(", ".join(f"{g}={row[GROUP + g]}"
                                                                             for g in groups)), cell])
        parts += [f"<h2>Worst {len(rows)} studies (foreground Dice)</h2>",
                  _table("worst", ["case", "Dice", "volume (ml)", "groups", "overlay (white: reference)"], rows)]
    if len(failed):
        rows = [[html.escape(str(r["case"])), html.escape(str(r["error_kind"])), html.escape(str(r["error"]))]
                for _, r in failed.iterrows()]
        parts += ["<h2>Failed studies</h2>", _table("failed", ["case", "error", "message"], rows)]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "img{max-width:100%}#worst img{max-width:420px}.note{color:#555}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(results_path: Path, output: Path, title: str = "MRISegAssist study report",
                 n_worst: int = N_WORST) -> Path:
    """Read the results table at ``results_path`` (folder, ``.parquet`` or ``.csv``) and write the HTML page to
    ``output`` (atomically)."""
    from ..outputs import Output, guard_outputs

    if not str(output).lower().endswith((".html", ".htm")):
        raise InputError(f"-o {output}: the report is an HTML page; give a .html file name")
    results = ResultsTable.read(results_path)
    guard_outputs([Output(Path(output), "any", "-o")], inputs=[results.source if results.source.is_file() else None])
    return write_text(output, build_html(results, title, n_worst))
