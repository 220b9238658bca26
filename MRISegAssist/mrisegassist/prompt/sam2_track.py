"""A lean SAM 2 propagation loop with the maths of ``SAM2VideoPredictor.propagate_in_video`` (sam2 1.1.0).

The prompted frames are still handled by the official predictor (``add_new_points_or_box`` and
``propagate_in_video_preflight``: a few frames). :meth:`Sam2Tracker.track` then follows every object of the
inference state over the window, forward from the first prompted frame and backward from it, in the official
order (frame by frame, objects in lock step), and reproduces per frame what ``_run_single_frame_inference`` ->
``track_step`` computes: memory-conditioned features (``_prepare_memory_conditioned_features``: the prompted
frames' memories, the ``num_maskmem - 1`` previous frames by ``t_pos``, the object pointers of the past
``max_obj_ptrs_in_encoder`` frames with their temporal encoding), the model's ``_forward_sam_heads`` and
``_encode_new_memory``, memories kept in bf16 as the official state keeps them. What changes is the bookkeeping:

* every frame's outputs live in device *banks* indexed by row (``row * B + b`` for object ``b``): memory
  features ``[rows * B, HW, mem_dim]`` (bf16), object pointers, low-resolution mask logits and object scores;
  a frame's memory is gathered inside the step from integer index vectors made on the host (which frames the
  official rules pick depends only on frame numbers, never on data), so no result crosses back to the host
  during the walk; the video-resolution masks are made and copied back once per window (and per few frames
  only when an unbounded window must detect that the object vanished);
* the prompt embeddings of an unprompted frame are the model's own (no points, no mask);
* ``fixed`` shapes (for CUDA graphs / ``torch.compile``): every object of the window in one batch, a fixed
  number of memory slots and pointer tokens, the unused ones masked out of the cross-attention (``-inf``
  scores: the same softmax), and a pointer-position table computed once per window. One step is then one
  ``CUDAGraph.replay``. Without ``fixed`` (the CPU default) each object runs alone with exactly the official
  shapes and the official ``MemoryAttention`` module.

Frames are window-relative (``f = k - z0``), as in the official state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import CancelToken, check
from .accel import AccelOptions, autocast, is_cuda_oom

#: rows of the banks for fixed shapes: at least this many (then powers of two), so one CUDA graph serves
#: every window of up to ``MIN_ROWS - cond frames - 1`` slices
MIN_ROWS = 512


class Vanish:
    """Early stop of one propagation direction: an object is finished once it has been empty on
    ``frames`` consecutive frames beyond its outermost prompted frame in the direction of travel."""

    def __init__(self, frames: int, outermost: dict[int, int], reverse: bool) -> None:
        self.frames, self.outermost, self.reverse = frames, outermost, reverse
        self.empty = {oid: 0 for oid in outermost}
        self.done: set[int] = set()

    def update(self, f: int, oid: int, nonempty: bool) -> None:
        beyond = f < self.outermost[oid] if self.reverse else f > self.outermost[oid]
        if not beyond or oid in self.done:
            return
        self.empty[oid] = 0 if nonempty else self.empty[oid] + 1
        if self.empty[oid] >= self.frames:
            self.done.add(oid)

    @property
    def all_done(self) -> bool:
        return len(self.done) == len(self.outermost)


@dataclass
class FrameFeatures:
    """One frame's image features as the model's ``forward_image`` returns them (batch 1): the three
    ``backbone_fpn`` levels (levels 0/1 already through ``conv_s0``/``conv_s1``) and the top level's
    position encoding."""

    fpn: Sequence[torch.Tensor]
    pos: torch.Tensor


@dataclass
class TrackedObject:
    """One object's outcome over a window: ``slices`` = frames in the order first written, ``logits``
    ``[len(slices), H, W]`` float32 (video resolution, bounds applied; the last computation of a frame),
    ``scores`` = presence probability per frame."""

    obj_id: int
    slices: list[int] = field(default_factory=list)
    logits: Optional[np.ndarray] = None
    scores: dict[int, float] = field(default_factory=dict)


@dataclass
class _Banks:
    rows: int
    batch: int
    mem: torch.Tensor      # [rows * B, HW, mem_dim] bf16
    ptr: torch.Tensor      # [rows * B, C] float32
    masks: torch.Tensor    # [rows * B, 1, h, w] float32 (low resolution logits)
    scores: torch.Tensor   # [rows * B, 1] float32 (object score logits)
    mem_pos: torch.Tensor  # [HW, mem_dim] float32, the (frame-independent) memory position encoding
    pos_table: torch.Tensor  # [2 * rows - 1, mem_dim] float32, pointer temporal encoding of -(rows-1)..rows-1


class _Graph:
    """A CUDA graph of one tracking step over static input buffers (``feats`` and ``index``)."""

    def __init__(self, run: Callable[[], None], device, dtype) -> None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), autocast(device, dtype, cache_enabled=False):
            for _ in range(2):  # warm-up (cuBLAS/cuDNN handles, compile) outside the capture
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), autocast(device, dtype, cache_enabled=False):
            run()

    def replay(self) -> None:
        self.graph.replay()


class _Fixed:
    """Static buffers and the captured graph (if any) of one fixed-shape configuration."""

    def __init__(self, banks: _Banks, feats: list[torch.Tensor], pos: torch.Tensor, index: torch.Tensor,
                 views: dict[str, torch.Tensor]) -> None:
        self.banks, self.feats, self.pos, self.index, self.views = banks, feats, pos, index, views
        self.graph: Optional[_Graph] = None
        self.step: Optional[Callable[[], None]] = None


def unsupported_reason(model) -> Optional[str]:
    """Why :class:`Sam2Tracker` cannot reproduce ``model``'s propagation (``None`` when it can)."""
    from sam2.modeling.sam.transformer import RoPEAttention

    if getattr(model, "num_maskmem", 0) <= 0:
        return "no memory (num_maskmem = 0)"
    if getattr(model, "training", False):
        return "training mode"
    for name, default in (("clear_non_cond_mem_around_input", False), ("add_all_frames_to_correct_as_cond", False),
                          ("non_overlap_masks", False), ("non_overlap_masks_for_mem_enc", False),
                          ("fill_hole_area", 0)):
        if getattr(model, name, default) != default:
            return f"{name} = {getattr(model, name)!r}"
    if not model.memory_attention.batch_first:
        return "memory attention is not batch-first"
    for layer in model.memory_attention.layers:
        if not isinstance(layer.self_attn, RoPEAttention) or not isinstance(layer.cross_attn_image, RoPEAttention):
            return "memory attention without RoPE attention"
        if layer.self_attn.num_heads != layer.cross_attn_image.num_heads:
            return "self- and cross-attention head counts differ"
    return None


class Sam2Tracker:
    """Follows the objects of a prompted ``SAM2VideoPredictor`` inference state (see the module docstring).

    ``fixed``: fixed shapes (all objects batched, padded memory); ``graphs``: replay each step as a CUDA graph
    (needs ``fixed`` and CUDA); ``compile``: a ``torch.compile`` mode for the step (``"off"``: eager).
    """

    def __init__(self, model, options: AccelOptions) -> None:
        self.model = model
        self.options = options
        self._fixed: dict[tuple, _Fixed] = {}
        #: what did not work as asked (compile or CUDA-graph failures and the fallback taken)
        self.notes: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    def clear(self) -> None:
        """Free the fixed-shape buffers and CUDA graphs (made again when next needed)."""
        self._fixed.clear()

    def _dtype(self):
        return self.options.dtype(str(self.device))

    @property
    def fixed(self) -> bool:
        return self.options.fixed_shapes(str(self.device))

    # ------------------------------------------------------------------------------------------ plans
    def _plan(self, f: int, reverse: bool, cond: dict[int, int], noncond: set[int], n: int):
        """The official memory selection for frame ``f`` of one object: ``(slots, ptrs)`` with ``slots`` =
        ``[(row, tpos_index)]`` (conditioning frames first) and ``ptrs`` = ``[(row, signed position)]``.
        ``cond`` maps the object's prompted frames (official dict order) to bank rows; ``noncond`` holds the
        frames with a tracked output (row = frame)."""
        from sam2.modeling.sam2_utils import select_closest_cond_frames

        m = self.model
        selected, unselected = select_closest_cond_frames(f, cond, m.max_cond_frames_in_attn)
        slots = [(row, m.num_maskmem - 1) for row in selected.values()]  # t_pos = 0
        stride = m.memory_temporal_stride_for_eval
        for t_pos in range(1, m.num_maskmem):
            t_rel = m.num_maskmem - t_pos
            if t_rel == 1:
                prev = f + t_rel if reverse else f - t_rel
            elif not reverse:
                prev = ((f - 2) // stride) * stride - (t_rel - 2) * stride
            else:
                prev = -(-(f + 2) // stride) * stride + (t_rel - 2) * stride
            row = prev if prev in noncond else unselected.get(prev)
            if row is not None:
                slots.append((row, m.num_maskmem - t_pos - 1))
        ptrs = []
        if m.use_obj_ptrs_in_encoder:
            max_ptrs = min(n, m.max_obj_ptrs_in_encoder)
            sign = -1 if reverse else 1
            for t, row in selected.items():
                if m.only_obj_ptrs_in_the_past_for_eval and not (t >= f if reverse else t <= f):
                    continue
                ptrs.append((row, (f - t) * sign if m.use_signed_tpos_enc_to_obj_ptrs else abs(f - t)))
            for t_diff in range(1, max_ptrs):
                t = f + t_diff if reverse else f - t_diff
                if t < 0 or t >= n:
                    break
                row = t if t in noncond else unselected.get(t)
                if row is not None:
                    ptrs.append((row, t_diff))
        return slots, ptrs

    # ----------------------------------------------------------------------------------------- banks
    def _new_banks(self, rows: int, batch: int, feat_hw: int, low_res: tuple[int, int]) -> _Banks:
        m, dev = self.model, self.device
        return _Banks(rows, batch,
                      mem=torch.zeros(rows * batch, feat_hw, m.mem_dim, dtype=torch.bfloat16, device=dev),
                      ptr=torch.zeros(rows * batch, m.hidden_dim, device=dev),
                      masks=torch.zeros(rows * batch, 1, *low_res, device=dev),
                      scores=torch.zeros(rows * batch, 1, device=dev),
                      mem_pos=torch.zeros(feat_hw, m.mem_dim, device=dev),
                      pos_table=torch.zeros(2 * rows - 1, m.mem_dim, device=dev))

    def _fill_tables(self, banks: _Banks, mem_pos: torch.Tensor, n: int) -> None:
        """The memory position encoding and the pointer temporal-encoding table for a window of ``n`` frames
        (``t_diff_max = min(n, max_obj_ptrs_in_encoder) - 1``, as the official code uses)."""
        m = self.model
        banks.mem_pos.copy_(mem_pos.flatten(2)[0].transpose(0, 1))
        if not (m.use_obj_ptrs_in_encoder and m.add_tpos_enc_to_obj_ptrs) or n < 2:
            banks.pos_table.zero_()
            return
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        t_diff_max = min(n, m.max_obj_ptrs_in_encoder) - 1
        tpos_dim = m.hidden_dim if m.proj_tpos_enc_in_obj_ptrs else m.mem_dim
        pos = torch.arange(-(banks.rows - 1), banks.rows, device=self.device)
        banks.pos_table.copy_(m.obj_ptr_tpos_proj(get_1d_sine_pe(pos / t_diff_max, dim=tpos_dim)).float())

    @staticmethod
    def _store(banks: _Banks, rows: torch.Tensor, out: dict) -> None:
        """Write one frame's compact official outputs (``maskmem_features``, ``obj_ptr``, ``pred_masks``,
        ``object_score_logits``; batch = ``len(rows)``) into the banks at flat ``rows``."""
        feats = out["maskmem_features"]
        banks.mem.index_copy_(0, rows, feats.to(torch.bfloat16).flatten(2).transpose(1, 2))
        banks.ptr.index_copy_(0, rows, out["obj_ptr"].float())
        banks.masks.index_copy_(0, rows, out["pred_masks"].float())
        banks.scores.index_copy_(0, rows, out["object_score_logits"].float())

    # ------------------------------------------------------------------------------------------ step
    def _step(self, banks: _Banks, fpn: Sequence[torch.Tensor], pos: torch.Tensor, rd_rows, rd_tpos, slot_ok,
              pt_rows, pt_pos, pt_ok, wr_rows, masked: bool) -> None:
        """One tracked frame for a batch of objects (``rd_rows.shape[1]``), results written into ``banks``.

        ``rd_rows``/``rd_tpos``/``slot_ok`` ``[S, B]``: memory slots (flat bank row, index into
        ``maskmem_tpos_enc``, used); ``pt_rows``/``pt_pos``/``pt_ok`` ``[P, B]``: object pointers (flat row,
        index into ``pos_table``, used); ``wr_rows`` ``[B]``: where this frame's outputs go.
        """
        m = self.model
        n_slots, batch = rd_rows.shape
        l0, l1, l2 = fpn
        C, H, W = l2.shape[1], l2.shape[2], l2.shape[3]
        hw, cm = H * W, m.mem_dim
        curr = l2.flatten(2).permute(2, 0, 1).expand(hw, batch, C)
        curr_pos = pos.flatten(2).permute(2, 0, 1).expand(hw, batch, C)
        # memory: [S * HW, B, mem_dim] (+ pointer tokens), as _prepare_memory_conditioned_features concatenates
        mem = banks.mem[rd_rows.reshape(-1)].view(n_slots, batch, hw, cm).transpose(1, 2).reshape(-1, batch, cm)
        tpos = m.maskmem_tpos_enc.view(m.num_maskmem, cm)[rd_tpos.reshape(-1)].view(n_slots, 1, batch, cm)
        mem_pos = (banks.mem_pos[None, :, None, :] + tpos).reshape(-1, batch, cm)
        memory, memory_pos, n_ptr_tokens = [mem.float()], [mem_pos], 0
        if pt_rows.shape[0] > 0:
            n_ptr = pt_rows.shape[0]
            ptrs = banks.ptr[pt_rows.reshape(-1)].view(n_ptr, batch, m.hidden_dim)
            obj_pos = banks.pos_table[pt_pos.reshape(-1)].view(n_ptr, batch, cm)
            if cm < m.hidden_dim:  # a pointer = hidden_dim / mem_dim tokens, each with the pointer's position
                split = m.hidden_dim // cm
                ptrs = ptrs.reshape(-1, batch, split, cm).permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos[:, None].expand(n_ptr, split, batch, cm).reshape(n_ptr * split, batch, cm)
            memory.append(ptrs)
            memory_pos.append(obj_pos)
            n_ptr_tokens = ptrs.shape[0]
        memory, memory_pos = torch.cat(memory, dim=0), torch.cat(memory_pos, dim=0)
        if masked:
            keep = [slot_ok.t()[:, :, None].expand(batch, n_slots, hw).reshape(batch, -1)]
            if n_ptr_tokens:
                n_ptr = pt_ok.shape[0]
                keep.append(pt_ok.t()[:, :, None].expand(batch, n_ptr, n_ptr_tokens // n_ptr).reshape(batch, -1))
            key_mask = torch.cat(keep, dim=1)[:, None, None, :]
            pix = _masked_memory_attention(m.memory_attention, curr, curr_pos, memory, memory_pos, n_ptr_tokens,
                                           key_mask)
        else:
            pix = m.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                     num_obj_ptr_tokens=n_ptr_tokens)
        pix = pix.permute(1, 2, 0).view(batch, C, H, W)
        high_res = [l0.expand(batch, -1, -1, -1), l1.expand(batch, -1, -1, -1)]
        _, _, _, low_res, high_res_masks, obj_ptr, score = m._forward_sam_heads(
            backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=high_res,
            multimask_output=m._use_multimask(False, None))
        maskmem, _ = m._encode_new_memory(current_vision_feats=[curr], feat_sizes=[(H, W)],
                                          pred_masks_high_res=high_res_masks, object_score_logits=score,
                                          is_mask_from_pts=False)
        self._store(banks, wr_rows, {"maskmem_features": maskmem, "obj_ptr": obj_ptr, "pred_masks": low_res,
                                     "object_score_logits": score})

    def _fixed_for(self, key: tuple, fpn: Sequence[torch.Tensor], pos: torch.Tensor, n_slots: int, n_ptr: int,
                   batch: int, rows: int, low_res: tuple[int, int]) -> _Fixed:
        fixed = self._fixed.get(key)
        if fixed is not None:
            return fixed
        hw = fpn[2].shape[2] * fpn[2].shape[3]
        banks = self._new_banks(rows, batch, hw, low_res)
        feats = [torch.zeros_like(x) for x in fpn]
        static_pos = torch.zeros_like(pos)
        sizes = {"rd_rows": n_slots * batch, "rd_tpos": n_slots * batch, "slot_ok": n_slots * batch,
                 "pt_rows": n_ptr * batch, "pt_pos": n_ptr * batch, "pt_ok": n_ptr * batch, "wr_rows": batch}
        index = torch.zeros(sum(sizes.values()), dtype=torch.long, device=self.device)
        views, at = {}, 0
        for name, size in sizes.items():
            views[name] = index[at:at + size].view(-1, batch) if name != "wr_rows" else index[at:at + size]
            at += size
        fixed = _Fixed(banks, feats, static_pos, index, views)
        # a harmless plan for the warm-up (and the capture): read and write the scratch rows only
        scratch = (rows - 1) * batch + torch.arange(batch, device=self.device)
        views["rd_rows"].copy_(scratch.expand(n_slots, batch))
        views["slot_ok"].fill_(1)
        views["pt_rows"].copy_(scratch.expand(n_ptr, batch))
        views["pt_pos"].fill_(rows - 1)
        views["pt_ok"].fill_(1)
        views["wr_rows"].copy_(scratch)

        def runner(step):
            def run() -> None:
                v = fixed.views
                step(banks, feats, static_pos, v["rd_rows"], v["rd_tpos"], v["slot_ok"] != 0, v["pt_rows"],
                     v["pt_pos"], v["pt_ok"] != 0, v["wr_rows"], True)
            return run

        dev, dtype = self.device, self._dtype()
        fixed.step = runner(self._step)
        if self.options.compile != "off":
            mode = None if self.options.compile == "default" else self.options.compile
            compiled = runner(torch.compile(self._step, dynamic=False, mode=mode))
            try:
                with autocast(dev, dtype, cache_enabled=False):
                    compiled()  # compiles
                fixed.step = compiled
            except Exception as exc:  # noqa: BLE001 - fall back to the eager step, say so
                if is_cuda_oom(exc):
                    raise
                self.notes.append(f"torch.compile failed, eager step used: {type(exc).__name__}: {str(exc)[:300]}")
        if self.options.use_graphs(str(dev)):
            try:
                fixed.graph = _Graph(fixed.step, dev, dtype)
            except Exception as exc:  # noqa: BLE001 - fall back to launching the step, say so
                if is_cuda_oom(exc):
                    raise
                torch.cuda.synchronize(dev)
                self.notes.append(f"CUDA graph capture failed, step launched eagerly: {type(exc).__name__}: "
                                  f"{str(exc)[:300]}")
        self._fixed[key] = fixed
        return fixed

    # ------------------------------------------------------------------------------------------ walk
    def track(self, state: dict, features: Callable[[int], FrameFeatures], *,
              prefetch: Optional[Callable[[list[int]], None]] = None, vanish_frames: Optional[int] = None,
              outside: Optional[dict[int, Optional[np.ndarray]]] = None, chunk: int = 8,
              tick: Optional[Callable[[int], None]] = None, cancel: Optional[CancelToken] = None
              ) -> list[TrackedObject]:
        """Propagate every object of the prompted ``state`` (after ``propagate_in_video_preflight``) over its
        window, forward then backward from the first prompted frame, as ``propagate_in_video`` does.

        ``features(f)``: frame ``f``'s :class:`FrameFeatures`; ``prefetch(frames)``: called with the frames the
        next steps need, before they run (batch encoding). ``vanish_frames``: unbounded window: a direction ends
        once every object has been empty that many frames beyond its outermost prompt (checked every ``chunk``
        frames; frames computed past the stop are discarded, as if never run). ``outside``: per object id a
        ``[H, W]`` bool mask set to ``OUTSIDE`` (its bounds) before the emptiness test and in the output.
        ``tick(f)`` after each frame.
        """
        m, dev = self.model, self.device
        n, obj_ids = int(state["num_frames"]), list(state["obj_ids"])
        batch = len(obj_ids)
        per_obj = [state["output_dict_per_obj"][i] for i in range(batch)]
        conds = [list(out["cond_frame_outputs"]) for out in per_obj]
        n_cond = max(len(c) for c in conds)
        fixed = self.fixed
        rows = n + n_cond + 1
        if fixed:
            rows = max(MIN_ROWS, 1 << (rows - 1).bit_length())
        cond_rows = [{t: n + j for j, t in enumerate(c)} for c in conds]
        start = min(t for c in conds for t in c)
        first = features(start)
        fpn, pos = [x for x in first.fpn], first.pos
        low_res = tuple(per_obj[0]["cond_frame_outputs"][conds[0][0]]["pred_masks"].shape[-2:])
        mem_pos = state["constants"]["maskmem_pos_enc"][-1]
        dtype = self._dtype()

        fx: Optional[_Fixed] = None
        if fixed:
            m_sel = m.max_cond_frames_in_attn
            n_sel = n_cond if m_sel == -1 else min(n_cond, m_sel)
            n_slots = n_sel + m.num_maskmem - 1
            n_ptr = (n_sel + m.max_obj_ptrs_in_encoder - 1) if m.use_obj_ptrs_in_encoder else 0
            key = (batch, n_slots, n_ptr, rows, tuple(fpn[2].shape[-2:]), str(dtype),
                   tuple(x.dtype for x in fpn))
            with torch.inference_mode():
                fx = self._fixed_for(key, fpn, pos, n_slots, n_ptr, batch, rows, low_res)
            banks = fx.banks
            fx.pos.copy_(pos)
        else:
            banks = self._new_banks(rows, batch, fpn[2].shape[2] * fpn[2].shape[3], low_res)
        with torch.inference_mode(), autocast(dev, dtype):
            self._fill_tables(banks, mem_pos, n)
            for b in range(batch):
                for t, row in cond_rows[b].items():
                    out = per_obj[b]["cond_frame_outputs"][t]
                    self._store(banks, torch.tensor([row * batch + b], device=dev), out)

        noncond: list[set[int]] = [set() for _ in range(batch)]
        tracked = [TrackedObject(oid) for oid in obj_ids]
        final_row: list[dict[int, int]] = [{} for _ in range(batch)]
        recorded: list[set[int]] = [set() for _ in range(batch)]
        outside_dev = self._outside_tensors(outside or {}, obj_ids)

        def record(f: int, b: int) -> None:
            row = cond_rows[b].get(f, f)
            final_row[b][f] = row
            if f not in recorded[b]:
                recorded[b].add(f)
                tracked[b].slices.append(f)

        for reverse in (False, True):
            order = list(range(start, -1, -1)) if reverse else list(range(start, n))
            if reverse and start == 0:
                order = []
            vanish = None
            if vanish_frames is not None:
                outermost = {b: (min if reverse else max)(conds[b]) for b in range(batch)}
                vanish = Vanish(vanish_frames, outermost, reverse)
            pos_in = 0
            while pos_in < len(order):
                frames = order[pos_in:pos_in + chunk]
                if prefetch is not None:
                    prefetch(frames)
                added: list[list[int]] = []
                for f in frames:
                    check(cancel)
                    todo = [b for b in range(batch) if f not in cond_rows[b]]
                    if todo:
                        self._run_frame(f, reverse, todo, batch, features(f), banks, cond_rows, noncond, n, fx,
                                        dtype)
                    added.append([b for b in todo if f not in noncond[b]])
                    for b in todo:
                        noncond[b].add(f)
                if vanish is None:
                    for f in frames:
                        for b in range(batch):
                            record(f, b)
                        if tick is not None:
                            tick(f)
                    pos_in += len(frames)
                    continue
                flags = self._nonempty(banks, frames, cond_rows, batch, state, outside_dev)
                stop = None
                for j, f in enumerate(frames):
                    for b in range(batch):
                        if b in vanish.done:
                            continue
                        record(f, b)
                        vanish.update(f, b, bool(flags[j, b]))
                    if tick is not None:
                        tick(f)
                    if vanish.all_done:
                        stop = j
                        break
                if stop is not None:
                    for j in range(stop + 1, len(frames)):  # computed past the end: forget them
                        for b in added[j]:
                            noncond[b].discard(frames[j])
                    break
                pos_in += len(frames)

        with torch.inference_mode():
            self._finish(banks, tracked, final_row, batch, state, outside_dev)
        return tracked

    def _run_frame(self, f: int, reverse: bool, todo: list[int], batch: int, feats: FrameFeatures, banks: _Banks,
                   cond_rows, noncond, n: int, fx: Optional[_Fixed], dtype) -> None:
        dev = self.device
        plans = {b: self._plan(f, reverse, cond_rows[b], noncond[b], n) for b in todo}
        if fx is None:  # exact official shapes, one object at a time
            with torch.inference_mode(), autocast(dev, dtype):
                for b, (slots, ptrs) in plans.items():
                    packed = [r * batch + b for r, _ in slots] + [t for _, t in slots] + \
                        [r * batch + b for r, _ in ptrs] + [p + banks.rows - 1 for _, p in ptrs] + [f * batch + b]
                    idx = _to_device(torch.tensor(packed, dtype=torch.long), dev)
                    ns, npt = len(slots), len(ptrs)
                    one = torch.ones(1, 1, dtype=torch.bool, device=dev)
                    self._step(banks, feats.fpn, feats.pos, idx[:ns, None], idx[ns:2 * ns, None], one,
                               idx[2 * ns:2 * ns + npt, None], idx[2 * ns + npt:2 * ns + 2 * npt, None], one,
                               idx[-1:], masked=False)
            return
        v = fx.views
        n_slots, n_ptr = v["rd_rows"].shape[0], v["pt_rows"].shape[0]
        rows = banks.rows
        scratch = (rows - 1) * batch
        rd = np.full((3, n_slots, batch), 0, np.int64)
        pt = np.full((3, n_ptr, batch), 0, np.int64)
        rd[0] = scratch + np.arange(batch)
        pt[0] = scratch + np.arange(batch)
        pt[1] = rows - 1
        wr = scratch + np.arange(batch)
        for b in range(batch):
            if b not in plans:  # a prompted frame of this object: computed for the batch's sake, then dropped
                rd[2, 0, b] = 1
                continue
            slots, ptrs = plans[b]
            for s, (r, t) in enumerate(slots):
                rd[:, s, b] = (r * batch + b, t, 1)
            for s, (r, p) in enumerate(ptrs):
                pt[:, s, b] = (r * batch + b, p + rows - 1, 1)
            wr[b] = f * batch + b
        packed = torch.from_numpy(np.concatenate([rd.reshape(-1), pt.reshape(-1), wr]))
        fx.index.copy_(packed.pin_memory() if dev.type == "cuda" else packed, non_blocking=True)
        for dst, src in zip(fx.feats, feats.fpn):
            dst.copy_(src)
        with torch.inference_mode(), autocast(dev, dtype, cache_enabled=fx.graph is None):
            if fx.graph is not None:
                fx.graph.replay()
            else:
                fx.step()

    # --------------------------------------------------------------------------------------- outputs
    def _outside_tensors(self, outside: dict, obj_ids: list[int]) -> Optional[torch.Tensor]:
        masks = [outside.get(oid) for oid in obj_ids]
        if all(x is None for x in masks):
            return None
        shape = next(x.shape for x in masks if x is not None)
        stack = np.stack([np.zeros(shape, bool) if x is None else x for x in masks])
        return torch.from_numpy(stack).to(self.device)

    def _video_res(self, low: torch.Tensor, state: dict) -> torch.Tensor:
        """``[N, 1, h, w]`` low-resolution logits -> ``[N, H, W]`` at the video size
        (as ``_get_orig_video_res_output``)."""
        size = (int(state["video_height"]), int(state["video_width"]))
        if tuple(low.shape[-2:]) != size:
            low = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        return low[:, 0]

    def _nonempty(self, banks: _Banks, frames: list[int], cond_rows, batch: int, state: dict,
                  outside: Optional[torch.Tensor]) -> np.ndarray:
        """``[len(frames), B]`` bool: the frame's mask (video size, bounds applied) has a pixel > 0."""
        from .base import OUTSIDE_LOGIT

        rows = torch.tensor([cond_rows[b].get(f, f) * batch + b for f in frames for b in range(batch)],
                            device=self.device)
        with torch.inference_mode():
            logits = self._video_res(banks.masks[rows], state)
            logits = logits.view(len(frames), batch, *logits.shape[-2:])
            if outside is not None:
                logits = logits.masked_fill(outside[None], OUTSIDE_LOGIT)
            return (logits > 0).flatten(2).any(dim=2).cpu().numpy()

    def _finish(self, banks: _Banks, tracked: list[TrackedObject], final_row, batch: int, state: dict,
                outside: Optional[torch.Tensor], chunk: int = 64) -> None:
        from .base import OUTSIDE_LOGIT

        for b, obj in enumerate(tracked):
            rows = [final_row[b][f] * batch + b for f in obj.slices]
            parts = []
            for i in range(0, len(rows), chunk):
                idx = torch.tensor(rows[i:i + chunk], device=self.device)
                logits = self._video_res(banks.masks[idx], state)
                if outside is not None:
                    logits = logits.masked_fill(outside[b][None], OUTSIDE_LOGIT)
                parts.append(logits.cpu().numpy())
            shape = (0, int(state["video_height"]), int(state["video_width"]))
            obj.logits = np.concatenate(parts) if parts else np.zeros(shape, np.float32)
            if rows:
                scores = banks.scores[torch.tensor(rows, device=self.device)].sigmoid()[:, 0].cpu().numpy()
                obj.scores = {f: float(s) for f, s in zip(obj.slices, scores)}


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device (through pinned memory on CUDA)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _masked_memory_attention(module, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int, key_mask):
    """``MemoryAttention.forward`` (sam2 1.1.0, batch-first RoPE layers) with a boolean ``key_mask``
    ``[B, 1, 1, Nk]`` on the cross-attention keys (``False`` = padding)."""
    output = curr
    if module.pos_enc_at_input and curr_pos is not None:
        output = output + 0.1 * curr_pos
    output, curr_pos = output.transpose(0, 1), curr_pos.transpose(0, 1)
    memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
    for layer in module.layers:
        output = layer._forward_sa(output, curr_pos)
        tgt2 = layer.norm2(output)
        q = tgt2 + curr_pos if layer.pos_enc_at_cross_attn_queries else tgt2
        k = memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory
        tgt2 = _rope_attention(layer.cross_attn_image, q, k, memory, num_obj_ptr_tokens, key_mask)
        output = output + layer.dropout2(tgt2)
        tgt2 = layer.norm3(output)
        tgt2 = layer.linear2(layer.dropout(layer.activation(layer.linear1(tgt2))))
        output = output + layer.dropout3(tgt2)
    return module.norm(output).transpose(0, 1)


def _rope_attention(attn, q, k, v, num_k_exclude_rope: int, key_mask):
    """``RoPEAttention.forward`` with ``attn_mask=key_mask`` in the scaled dot-product attention."""
    from sam2.modeling.position_encoding import apply_rotary_enc

    q, k, v = attn.q_proj(q), attn.k_proj(k), attn.v_proj(v)
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    freqs = attn.freqs_cis
    if freqs.device != q.device or freqs.shape[0] != q.shape[-2]:
        side = int(round(q.shape[-2] ** 0.5))
        freqs = attn.compute_cis(end_x=side, end_y=side).to(q.device)
        attn.freqs_cis = freqs
    num_k_rope = k.size(-2) - num_k_exclude_rope
    q, k_rope = apply_rotary_enc(q, k[:, :, :num_k_rope], freqs_cis=freqs, repeat_freqs_k=attn.rope_k_repeat)
    k = torch.cat([k_rope, k[:, :, num_k_rope:]], dim=2) if num_k_exclude_rope else k_rope
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    return attn.out_proj(attn._recombine_heads(out))
