"""Overlay pictures and small benchmark plots (matplotlib, Agg backend; files written atomically).

Display convention (radiological): volumes are first reoriented to the closest LPS axes from their
direction matrix, then shown with the patient's **right on the left of the picture** and anterior at the
top (axial), superior at the top (coronal, sagittal), anterior on the left (sagittal). Pixel aspect follows
the voxel spacing, so thick-slice scans are not squashed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .labels import LabelInfo, LabelMap, default_color
from .outputs import atomic_write, verify_png
from .volume import Geometry, PathLike, Volume

ArrayLike = Union[np.ndarray, Volume, LabelMap]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _array(data: Optional[ArrayLike]) -> Optional[np.ndarray]:
    if data is None:
        return None
    if isinstance(data, LabelMap):
        return data.volume.array
    return data.array if isinstance(data, Volume) else np.asarray(data)


def _geometry_of(*items, spacing=None, direction=None) -> tuple[np.ndarray, np.ndarray]:
    """``(spacing (i, j, k), 3x3 direction)`` from the first Volume/LabelMap given, else the arguments."""
    for item in items:
        vol = item.volume if isinstance(item, LabelMap) else item
        if isinstance(vol, Volume):
            g: Geometry = vol.geometry
            return np.asarray(spacing if spacing is not None else g.spacing, float), g.direction_matrix
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    return np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), float), d


def canonical_axes(direction: np.ndarray) -> list[tuple[int, bool]]:
    """For output axes ``(S, P, L)`` (array order of an LPS image): ``(numpy axis, flip)`` of the input.

    Each ITK axis is assigned to its dominant LPS component (ties broken by column order).
    """
    d = np.asarray(direction, float).reshape(3, 3)
    used: set[int] = set()
    assign = {}
    for comp in np.argsort(-np.abs(d).max(axis=1)):  # most clear-cut components first
        order = [a for a in np.argsort(-np.abs(d[comp])) if a not in used]
        a = int(order[0])
        used.add(a)
        assign[int(comp)] = (2 - a, bool(d[comp, a] < 0))
    return [assign[2], assign[1], assign[0]]


def to_canonical(array: np.ndarray, axes: list[tuple[int, bool]]) -> np.ndarray:
    """Reorient a ``[k, j, i]`` array to ``[S, P, L]`` order (index 0 = inferior, anterior, right)."""
    out = np.transpose(array, [a for a, _ in axes])
    for m, (_, flip) in enumerate(axes):
        if flip:
            out = np.flip(out, axis=m)
    return out


def _window(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _centre(*label_arrays: Optional[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    for lab in label_arrays:
        if lab is not None and np.any(lab):
            idx = np.argwhere(lab > 0)
            # the voxel of the label closest to its centre of mass (robust for ring-shaped lesions)
            com = idx.mean(axis=0)
            return tuple(int(v) for v in idx[np.argmin(((idx - com) ** 2).sum(axis=1))])
    return tuple(int(s) // 2 for s in shape)


def _rgba(labels: np.ndarray, infos: Mapping[int, LabelInfo], alpha: float) -> np.ndarray:
    out = np.zeros(labels.shape + (4,), dtype=np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        info = infos.get(int(value))
        color = info.color if info is not None else default_color(int(value))
        out[labels == value] = (*color, alpha)
    return out


def overlay_png(image: ArrayLike, labels: Optional[ArrayLike], path: PathLike,
                label_info: Optional[Sequence[LabelInfo]] = None, slices: Optional[Sequence[int]] = None,
                reference: Optional[ArrayLike] = None, title: Optional[str] = None,
                spacing: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None,
                alpha: float = 0.45, dpi: int = 110, crop: bool = True) -> Path:
    """PNG with axial / coronal / sagittal views of ``image`` and a translucent label overlay.

    ``image`` and ``labels`` are ``[k, j, i]`` arrays (or Volume / LabelMap, whose geometry is used);
    ``spacing`` is ``(i, j, k)`` mm and ``direction`` the 3x3 ITK direction (LPS), both only needed for bare
    arrays (default 1 mm, identity). ``slices`` = ``(k, j, i)`` voxel indices of the three cut planes in the
    input array (default: the label voxel nearest the lesion's centre of mass, else the volume centre).
    ``reference`` adds a second row with the reference labels and draws its outline (white) on the
    prediction row. ``label_info`` names and colours the labels (default: the LabelMap's, else palette).
    ``crop`` zooms on the non-zero part of the image (the brain of skull-stripped data). Returns ``path``.
    """
    img = _array(image)
    if img is None or img.ndim != 3:
        raise InputError(f"overlay needs a 3D image, got shape {None if img is None else img.shape}")
    lab = _array(labels)
    ref = _array(reference)
    for name, arr in (("labels", lab), ("reference", ref)):
        if arr is not None and arr.shape != img.shape:
            raise InputError(f"overlay: {name} shape {arr.shape} differs from image shape {img.shape}")
    sp, d = _geometry_of(image, labels, reference, spacing=spacing, direction=direction)
    if label_info is None and isinstance(labels, LabelMap):
        label_info = labels.labels
    infos = {lab_.value: lab_ for lab_ in (label_info or [])}
    centre = tuple(slices) if slices is not None else _centre(lab, ref, shape=img.shape)
    if len(centre) != 3 or not all(0 <= int(c) < s for c, s in zip(centre, img.shape)):
        raise InputError(f"overlay: slices {tuple(centre)} outside the volume (k, j, i) shape {img.shape}")

    axes = canonical_axes(d)
    spacing_kji = np.asarray(sp, float)[::-1]
    cimg = to_canonical(img, axes)
    clab = None if lab is None else to_canonical(lab, axes)
    cref = None if ref is None else to_canonical(ref, axes)
    csp = [spacing_kji[a] for a, _ in axes]  # spacing of (S, P, L)
    cpos = [(img.shape[a] - 1 - int(centre[a])) if flip else int(centre[a]) for a, flip in axes]
    lo, hi = _window(img)
    if crop:  # zoom on the non-zero part of the image (skull-stripped data), keeping the cut planes inside
        nz = np.argwhere(cimg != 0)
        if len(nz):
            start = np.minimum(nz.min(axis=0) - 4, cpos).clip(0)
            stop = np.maximum(nz.max(axis=0) + 5, np.add(cpos, 1)).clip(None, cimg.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
            cimg = cimg[box]
            clab = None if clab is None else clab[box]
            cref = None if cref is None else cref[box]
            cpos = [int(c - a) for c, a in zip(cpos, start)]

    # (name, slicer, row spacing, col spacing, origin)
    views = [("axial", lambda a: a[cpos[0]], csp[1], csp[2], "upper"),
             ("coronal", lambda a: a[:, cpos[1]], csp[0], csp[2], "lower"),
             ("sagittal", lambda a: a[:, :, cpos[2]], csp[0], csp[1], "lower")]
    rows = [("prediction" if cref is not None else ("labels" if clab is not None else "image"), clab, cref)]
    if cref is not None:
        rows.append(("reference", cref, None))
    plt = _plt()
    fig, axs = plt.subplots(len(rows), 3, figsize=(12, 4.3 * len(rows) + 0.8), squeeze=False, layout="constrained")
    for r, (row_name, overlay, outline) in enumerate(rows):
        for c, (view, cut, row_sp, col_sp, origin) in enumerate(views):
            ax = axs[r, c]
            ax.imshow(cut(cimg), cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=row_sp / col_sp,
                      interpolation="nearest")
            if overlay is not None:
                ax.imshow(_rgba(cut(overlay), infos, alpha), origin=origin, aspect=row_sp / col_sp,
                          interpolation="nearest")
            if outline is not None and np.any(cut(outline)):
                mask = cut(outline) > 0  # explicit pixel-centre coordinates match imshow for either origin
                ax.contour(np.arange(mask.shape[1]), np.arange(mask.shape[0]), mask, levels=[0.5], colors="white",
                           linewidths=0.8)
            ax.set_title(f"{row_name}: {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.text(0.01, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
                ax.text(0.97, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
    present = set()
    for arr in (lab, ref):
        if arr is not None:
            present |= {int(v) for v in np.unique(arr) if v != 0}
    if present:
        import matplotlib.patches as mpatches

        handles = [mpatches.Patch(color=(infos[v].color if v in infos else default_color(v)),
                                  label=(infos[v].name if v in infos else f"label {v}")) for v in sorted(present)]
        if cref is not None:
            handles.append(mpatches.Patch(facecolor="none", edgecolor="0.4", label="reference outline (white)"))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False)
    fig.suptitle((title + "\n" if title else "") + f"slices k={centre[0]} j={centre[1]} i={centre[2]} "
                 f"(radiological: patient right on the left)", fontsize=10)
    return save_figure(fig, path, dpi)


def save_figure(fig, path: PathLike, dpi: int) -> Path:
    """Write a matplotlib figure as PNG atomically, verified by reading it back (:func:`verify_png`); closes it."""
    plt = _plt()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"), verify_png)
    finally:
        plt.close(fig)


def plot_bars(values: Mapping[str, Union[float, Mapping[str, float]]], path: PathLike, title: str = "",
              ylabel: str = "", dpi: int = 110) -> Path:
    """Bar chart: ``{name: value}`` or grouped ``{group: {series: value}}`` (e.g. Dice per label per model)."""
    if not values:
        raise InputError("plot_bars: nothing to plot")
    groups = list(values)
    grouped = isinstance(next(iter(values.values())), Mapping)
    series = sorted({s for g in groups for s in values[g]}) if grouped else [""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(len(series), 1)), 4))
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for n, s in enumerate(series):
        ys = [(values[g].get(s, np.nan) if grouped else values[g]) for g in groups]
        bars = ax.bar(x + (n - (len(series) - 1) / 2) * width, ys, width, label=s or None)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grouped:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def plot_benchmark(results: Mapping[str, float], path: PathLike, baseline: Optional[str] = None,
                   title: str = "", unit: str = "s", dpi: int = 110) -> Path:
    """Horizontal bars of benchmark figures ``{run: value}``; with ``baseline`` each bar is annotated with
    its ratio to the baseline run (measured in the same process)."""
    if not results:
        raise InputError("plot_benchmark: nothing to plot")
    if baseline is not None and baseline not in results:
        raise InputError(f"plot_benchmark: baseline {baseline!r} not among {', '.join(results)}")
    names = list(results)
    vals = [float(results[n]) for n in names]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, vals, color=["#888888" if n == baseline else "#3a7bd5" for n in names])
    base = float(results[baseline]) if baseline is not None else None
    labels = [f"{v:.3g} {unit}" + (f"  ({v / base:.2f}x)" if base else "") for v in vals]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(vals) * 1.35 if max(vals) > 0 else 1)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
