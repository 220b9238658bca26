"""U-Net inference: a case (one to four sequences on one grid) -> a named label map on the reference grid.

Pipeline: map the sequences onto the model grid (axis-aligned LPS at the model spacing; an exact
transpose/flip when possible) -> per-sequence z-score in the foreground -> crop to the foreground bounding box
-> batched slice-wise (2D) or ``monai.inferers.sliding_window_inference`` (3D) softmax, background wherever
every sequence is background (empty slices and the crop margin) -> probabilities back
onto the reference grid (linear) -> argmax -> class-to-label mapping -> small-component removal.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..devices import check_device
from ..errors import InputError
from ..labels import LabelMap
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Case, PathLike, Volume, load_case
from .entries import ModelEntry, get_model
from .networks import size_divisor
from .postprocess import decode_brats_sigmoid, map_classes, remove_small_components
from .preprocess import ModelGrid, foreground_bbox, prepare_inputs


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (or ``None`` = cpu) -> a usable :class:`torch.device`; any other
    name, or a device not available here, is an InputError (the one device rule, :mod:`mrisegassist.devices`)."""
    return torch.device(check_device(str(device) if device is not None else "cpu"))


def _pad_to(array: np.ndarray, divisor: int, axes: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad ``array`` at the end of ``axes`` to multiples of ``divisor``; returns it and the crop back."""
    pads = [(0, 0)] * array.ndim
    for a in axes:
        pads[a] = (0, (-array.shape[a]) % divisor)
    crop = tuple(slice(0, s) for s in array.shape)
    return (np.pad(array, pads) if any(p[1] for p in pads) else array), crop


def predict_crop(network: torch.nn.Module, x: np.ndarray, fg: np.ndarray, dims: str, device: torch.device,
                 *args, **kwargs) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Softmax probabilities ``(K, s, p, l)`` float32 inside the bounding box of ``fg`` (bool ``(S, P, L)``),
    and that box (slices of the model grid). ``x`` is ``(C, S, P, L)`` on the model grid. Where every input
    is background (the box margin, empty slices) the background class has probability 1. Keyword arguments:
    ``roi_size`` (3D window), ``divisor``, ``batch_size`` (2D slices per batch), ``overlap``, ``progress``,
    ``cancel``, ``start``/``stop`` (progress fractions)."""
    out, box, _ = _predict(network, x, fg, dims, device, *args, **kwargs)
    return out, box


def _slices(crop: np.ndarray, k0: int, k1: int, context: int) -> np.ndarray:
    """Slices ``k0:k1`` of ``crop`` ``(C, S, P, L)`` as a batch ``(B, C * (2 * context + 1), P, L)``: each slice
    with its ``context`` neighbours below and above (zeros beyond the crop), sequence-major channels as
    :func:`mrisegassist.unet.data.make_transforms`."""
    if not context:
        return crop[:, k0:k1].transpose(1, 0, 2, 3).copy()
    c, n = crop.shape[:2]
    depth = 2 * context + 1
    out = np.zeros((k1 - k0, c * depth) + crop.shape[2:], dtype=np.float32)
    for d in range(-context, context + 1):
        lo, hi = max(k0 + d, 0), min(k1 + d, n)
        if lo < hi:
            out[lo - d - k0:hi - d - k0, np.arange(c) * depth + d + context] = crop[:, lo:hi].transpose(1, 0, 2, 3)
    return out


def _activate(logits: torch.Tensor, output: str, classes_only: bool, dim: int) -> np.ndarray:
    """Class indices (``classes_only``) or channel probabilities of network ``logits`` along ``dim``."""
    if output == "sigmoid-brats":
        probs = torch.sigmoid(logits).cpu().numpy()
        return decode_brats_sigmoid(np.moveaxis(probs, dim, 0)) if classes_only else probs
    if classes_only:  # argmax of the logits = argmax of the softmax
        return torch.argmax(logits, dim=dim).to(torch.uint8).cpu().numpy()
    return torch.softmax(logits, dim=dim).cpu().numpy()


@torch.inference_mode()
def _predict(network: torch.nn.Module, x: np.ndarray, fg: np.ndarray, dims: str, device: torch.device,
             roi_size: Sequence[int] = (128, 128, 128), divisor: int = 16, batch_size: int = 32,
             overlap: float = 0.25, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             start: float = 0.0, stop: float = 1.0, classes_only: bool = False, context: int = 0,
             output: str = "softmax") -> tuple[np.ndarray, tuple[slice, ...], int]:
    """:func:`predict_crop`, plus the number of classes (channels); ``classes_only``: class indices
    ``(s, p, l)`` uint8 instead of probabilities (in 2D taken batch by batch: no class-by-volume array at all).
    ``context``: neighbouring slices per side given to a 2.5D model; ``output``: see
    :data:`~mrisegassist.unet.postprocess.OUTPUTS` (``"sigmoid-brats"``: per-channel sigmoid probabilities,
    0 outside the foreground)."""
    box = foreground_bbox(fg, margin=4)
    crop = x[(slice(None),) + box]  # a view: 2D batches are copied one by one, 3D windows sliced from it
    outside = ~fg[box]
    if dims == "2d":
        crop, back = _pad_to(crop, divisor, axes=(2, 3))
        n = crop.shape[1]
        out, n_classes = None, 0
        for k0 in range(0, n, batch_size):
            check(cancel)
            report(progress, start + (stop - start) * k0 / n, f"slices {k0}/{n}")
            k1 = min(k0 + batch_size, n)
            logits = network(torch.from_numpy(_slices(crop, k0, k1, context)).to(device)).float()
            n_classes = logits.shape[1]
            p = _activate(logits, output, classes_only, dim=1)
            if classes_only:
                out = np.zeros(crop.shape[1:], np.uint8) if out is None else out
                out[k0:k1] = p
            else:
                out = np.zeros((n_classes,) + crop.shape[1:], np.float32) if out is None else out
                out[:, k0:k1] = p.transpose(1, 0, 2, 3)
        out = out[back[1:]] if classes_only else out[(slice(None),) + back[1:]]
    else:
        from monai.inferers import sliding_window_inference

        check(cancel)
        report(progress, start, "sliding window")
        # windows no larger than the (divisor-rounded) crop: a small brain is not padded up to a large ROI
        roi = [int(min(r, -(-s // divisor) * divisor)) for r, s in zip(roi_size, crop.shape[1:])]
        tensor = torch.from_numpy(np.ascontiguousarray(crop[None])).to(device)
        logits = sliding_window_inference(tensor, roi, sw_batch_size=1, predictor=network, overlap=overlap,
                                          mode="gaussian", progress=False)
        logits = logits[0].float().cpu()
        n_classes = logits.shape[0]
        if classes_only or output != "softmax":
            out = _activate(logits, output, classes_only, dim=0)
        else:  # softmax in place: no second class-by-volume array
            logits -= logits.max(dim=0, keepdim=True).values
            logits.exp_()
            logits /= logits.sum(dim=0, keepdim=True)
            out = logits.numpy()
    if outside.any():
        if classes_only:
            out[outside] = 0
        else:
            out[:, outside] = 0.0
            if output == "softmax":
                out[0, outside] = 1.0
    report(progress, stop, "network done")
    return out, box, n_classes


def predict_probabilities(network: torch.nn.Module, x: np.ndarray, fg: np.ndarray, dims: str,
                          device: torch.device, *args, **kwargs) -> np.ndarray:
    """Probabilities ``(K, S, P, L)`` on the whole model grid (softmax: background = 1 outside the foreground
    box; sigmoid channels: 0 there); arguments as :func:`predict_crop`."""
    out, box = predict_crop(network, x, fg, dims, device, *args, **kwargs)
    full = np.zeros((out.shape[0],) + fg.shape, dtype=np.float32)
    if kwargs.get("output", "softmax") == "softmax":
        full[0] = 1.0
    full[(slice(None),) + box] = out
    return full


def predict_classes(network: torch.nn.Module, x: np.ndarray, fg: np.ndarray, dims: str, device: torch.device,
                    *args, **kwargs) -> tuple[np.ndarray, int]:
    """Argmax classes ``(S, P, L)`` uint8 on the model grid and the number of classes (no full-size
    probability array is kept); arguments as :func:`predict_crop`."""
    out, box, n_classes = _predict(network, x, fg, dims, device, *args, classes_only=True, **kwargs)
    classes = np.zeros(fg.shape, dtype=np.uint8)
    classes[box] = out
    return classes, n_classes


class UNetSegmenter:
    """A model loaded once onto a device; :meth:`segment` runs it on cases.

    ``model`` is a registry name, a path (see :func:`~mrisegassist.unet.entries.get_model`) or a
    :class:`ModelEntry`. ``min_component_mm3`` overrides the entry's small-component threshold.
    """

    def __init__(self, model: Union[str, Path, ModelEntry], device: Union[str, torch.device, None] = "cpu",
                 batch_size: int = 32, overlap: Optional[float] = None, min_component_mm3: Optional[float] = None,
                 network: Optional[torch.nn.Module] = None, download: bool = False, trust_code: bool = False,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> None:
        self.entry = get_model(model, trust_code=trust_code)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.overlap = float(self.entry.overlap if overlap is None else overlap)
        self.min_component_mm3 = self.entry.min_component_mm3 if min_component_mm3 is None else min_component_mm3
        self.network = network.to(self.device).eval() if network is not None else \
            self.entry.load_network(self.device, download=download, progress=progress, cancel=cancel)
        self.divisor = size_divisor(self.entry.network) if self.entry.network else 16
        self.timings: dict[str, float] = {}

    @property
    def inputs(self) -> list[str]:
        return list(self.entry.inputs)

    def _inputs(self, images: Mapping[str, np.ndarray], grid: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        x, fg = prepare_inputs(images, self.entry.inputs, grid, self.entry.normalization)
        self.timings["preprocess_s"] = time.perf_counter() - t0
        return x, fg

    def _network_args(self, progress, cancel) -> dict:
        return dict(roi_size=self.entry.roi_size, divisor=self.divisor, batch_size=self.batch_size,
                    overlap=self.overlap, progress=progress, cancel=cancel, start=0.1, stop=0.85,
                    context=self.entry.context, output=self.entry.output)

    def probabilities(self, images: Mapping[str, np.ndarray], grid: ModelGrid,
                      progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelToken] = None) -> np.ndarray:
        """``(K, S, P, L)`` class probabilities on the model grid of ``grid`` (inputs on ``grid.source``)."""
        x, fg = self._inputs(images, grid)
        t0 = time.perf_counter()
        probs = predict_probabilities(self.network, x, fg, self.entry.dims, self.device,
                                      **self._network_args(progress, cancel))
        self.timings["network_s"] = time.perf_counter() - t0
        return probs

    def segment(self, case: Case, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> LabelMap:
        """Label map on ``case.geometry`` (the reference sequence's grid) with the model's named labels."""
        missing = [n for n in self.entry.inputs if n not in case.images]
        if missing:
            raise InputError(f"model {self.entry.name!r} needs sequence(s) {', '.join(missing)}; "
                             f"the case has {', '.join(case.images) or 'none'}")
        check(cancel)
        report(progress, 0.0, "preprocessing")
        grid = ModelGrid.for_geometry(case.geometry, self.entry.spacing)
        if grid.exact:  # argmax commutes with a transpose/flip: no full-size probability maps needed
            x, fg = self._inputs(case.images, grid)
            t0 = time.perf_counter()
            model_classes, n_classes = predict_classes(self.network, x, fg, self.entry.dims, self.device,
                                                       **self._network_args(progress, cancel))
            if self.entry.output == "sigmoid-brats":
                n_classes = 4  # background, core, oedema, enhancing
            self.timings["network_s"] = time.perf_counter() - t0
            del x
            check(cancel)
            t0 = time.perf_counter()
            classes = grid.to_reference(model_classes)
        else:
            probs = self.probabilities(case.images, grid, progress, cancel)
            check(cancel)
            report(progress, 0.85, "mapping back to the reference grid")
            t0 = time.perf_counter()
            classes, n_classes = self._classes_on_reference(probs, grid, self.entry.output), probs.shape[0]
            if self.entry.output == "sigmoid-brats":
                n_classes = 4  # background, core, oedema, enhancing
        labels = map_classes(classes, self.entry.class_to_label(n_classes))
        labels = remove_small_components(labels, case.geometry.spacing, self.min_component_mm3)
        self.timings["postprocess_s"] = time.perf_counter() - t0
        report(progress, 1.0, "done")
        volume = Volume(labels, case.geometry, f"{self.entry.name} labels")
        return LabelMap(volume, self.entry.label_infos())

    @staticmethod
    def _classes_on_reference(probs: np.ndarray, grid: ModelGrid, output: str = "softmax") -> np.ndarray:
        """Resample each class probability linearly onto the reference grid and take the argmax (sigmoid
        channels: resample each, then decode them as the model's output says)."""
        if output == "sigmoid-brats":
            return decode_brats_sigmoid([grid.to_reference(p, default=0.0) for p in probs])
        best = grid.to_reference(probs[0], default=1.0)
        classes = np.zeros(best.shape, dtype=np.uint8)
        for c in range(1, probs.shape[0]):
            p = grid.to_reference(probs[c], default=0.0)
            better = p > best
            classes[better] = c
            best = np.where(better, p, best)
        return classes


def load_model_case(segmenter: "UNetSegmenter", inputs: Mapping[str, Union[PathLike, Volume]],
                    reference: Optional[str] = None) -> Case:
    """Read the model's sequences (name -> path or Volume; extra ones ignored) onto the ``reference`` grid
    (default: the model's first input). InputError names missing sequences before anything is read."""
    missing = [n for n in segmenter.inputs if n not in inputs]
    if missing:
        raise InputError(f"model {segmenter.entry.name!r} needs sequence(s) {', '.join(missing)}; "
                         f"given {', '.join(inputs) or 'none'}")
    if reference is not None and reference not in inputs:
        raise InputError(f"reference sequence {reference!r} is not among the inputs ({', '.join(inputs)})")
    reference = reference or segmenter.inputs[0]
    needed = {reference: inputs[reference], **{n: inputs[n] for n in segmenter.inputs}}
    return load_case(needed, reference)


def segment_files(model: Union[str, Path, ModelEntry], inputs: Mapping[str, Union[PathLike, Volume]],
                  reference: Optional[str] = None, device: Union[str, torch.device, None] = "cpu",
                  progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                  download: bool = False, trust_code: bool = False) -> LabelMap:
    """Read the sequences (name -> path or Volume), resample onto ``reference`` (default: the model's first
    input) and segment. Returns the label map on the reference grid. ``download``: fetch catalog weights that
    are not in the cache; ``trust_code``: let a MONAI bundle's config run (see :mod:`mrisegassist.unet.bundle`)."""
    segmenter = UNetSegmenter(model, device, download=download, trust_code=trust_code)
    return segmenter.segment(load_model_case(segmenter, inputs, reference), progress, cancel)
