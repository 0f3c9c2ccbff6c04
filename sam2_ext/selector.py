"""Which stored memories a SAM2 frame attends to: official recency, a quality score, or a GT oracle.

Why: official SAM2 always attends to the ``num_maskmem - 1`` most recent frame memories (and the object pointers of
up to ``max_obj_ptrs_in_encoder - 1`` recent frames). Slice-by-slice through a 3D volume one bad early prediction
therefore poisons every later slice. A selector lets the predictor attend to the *best* stored memories instead.

How it plugs in: ``ICLPredictor.memory_selector`` is called at the top of ``_prepare_memory_conditioned_features`` as
``select(model, inference_state, output_dict, frame_idx, num_frames, track_in_reverse)`` and returns an
``output_dict`` *view* (never mutating the real memory bank):

* ``cond_frame_outputs`` holds the support (conditioning) memories kept for this frame: all of them, capped by the
  model's ``max_cond_frames_in_attn`` with SAM2's own "temporally closest" rule;
* ``non_cond_frame_outputs`` holds the chosen K frame memories re-keyed onto the slots SAM2 reads (``frame_idx ∓ 1``
  for the most recent chosen one, then SAM2's strided slots), ordered by recency, so SAM2's temporal position
  encodings stay meaningful. SAM2 reads object pointers from those same keys (the chosen memories' own pointers)
  and from the keys ``frame_idx ∓ 1 .. ∓ (max_obj_ptrs_in_encoder - 1)`` that are no memory slot; those get
  pointer-only entries of the next best-ranked frames, again ordered by recency (``pointers`` caps how many frames
  give pointers in all). A frame left out contributes neither its mask memory nor its object pointer. So with
  weights on recency only, the full budget and memory stride 1, ``scored`` reproduces SAM2's own choice exactly.

Scores (policy ``scored``), each in ``[0, 1]``, combined as a weighted mean of the available terms:

* confidence: ``mean |sigmoid(l) - 0.5| * 2`` of the stored low-res mask logits ``l`` over the predicted foreground
  plus its uncertain rim, i.e. pixels with ``l > -uncertain_logit``; 0 when that region is empty (nothing to remember);
* predicted IoU: the stored ``iou_pred`` (clamped to ``[0, 1]``; the term is skipped if a memory has none);
* object score: ``sigmoid(object_score_logits)``; memories with logit ``< min_object_score`` ("object absent") are
  never used as memory;
* recency: ``decay ** (distance - 1)`` with ``distance = |frame_idx - t|``.

The K best-scored frames give mask memories; the next best give object pointers where SAM2 has pointer-only
keys left. ``min_score`` removes low-scored frames from both.

Policy ``oracle`` scores each stored memory by the IoU of its prediction with the ground truth attached through
``attach_ground_truth`` (an upper bound for analysis; ties go to the more recent memory).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import select_closest_cond_frames

from sam2_ext.errors import OptionError, Sam2ExtError

POLICIES = ("recency", "scored", "oracle")
OPTION = "memory_selector"  # the name errors give; applications spell it as their flag
_GT_KEY = "memory_selector_gt"  # inference_state key holding {obj_id: {frame_idx: mask}}
_CACHE_KEY = "memory_selector_cache"  # inference_state key holding per-memory quality terms


@dataclass
class SelectorConfig:
    """Options of a :class:`MemorySelector` (one source of truth for a ``memory_selector`` option)."""

    policy: str = "recency"
    budget: int | None = None  # K frame memories attended to; None = the model's num_maskmem - 1
    w_conf: float = 1.0  # weight of mask confidence
    w_iou: float = 1.0  # weight of predicted IoU
    w_obj: float = 0.5  # weight of object presence probability
    w_recency: float = 1.0  # weight of the recency term
    decay: float = 0.9  # recency term = decay ** (distance - 1)
    min_object_score: float | None = 0.0  # memories with object logit below this are never used; None = keep all
    uncertain_logit: float = 2.0  # confidence region: pixels with logit > -uncertain_logit
    window: int | None = None  # only consider the last `window` frames; None = every stored frame memory
    pointers: int | None = None  # frames giving object pointers (>= budget); None = max_obj_ptrs_in_encoder - 1
    min_score: float | None = None  # frames scoring below this give neither memory nor pointer; None = no cut

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise OptionError(OPTION, f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.budget is not None and self.budget < 0:
            raise OptionError(OPTION, f"budget must be >= 0, got {self.budget}")
        if self.policy == "recency" and self.budget is not None:
            raise OptionError(OPTION, "policy 'recency' is SAM2's official behaviour and takes no budget; "
                                   "use 'scored' (e.g. scored:budget=4) to limit the memories")
        for name in ("w_conf", "w_iou", "w_obj", "w_recency"):
            if getattr(self, name) < 0:
                raise OptionError(OPTION, f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.decay <= 1.0:
            raise OptionError(OPTION, f"decay must be in (0, 1], got {self.decay}")
        if self.window is not None and self.window < 1:
            raise OptionError(OPTION, f"window must be >= 1, got {self.window}")
        if self.pointers is not None and self.pointers < (self.budget or 0):
            raise OptionError(OPTION, f"pointers ({self.pointers}) must be >= budget ({self.budget}): "
                                   "every chosen memory brings its own object pointer")


@dataclass
class Selection:
    """What one ``select`` call chose, for analysis and tests (frame ids are real bank frames, slot order)."""

    obj_idx: int | None
    frame_idx: int
    cond_frames: list[int]
    memory_frames: list[int]  # chosen frame memories, most recent first (slot t_rel = 1, 2, ...)
    pointer_frames: list[int] = field(default_factory=list)  # frames giving only their object pointer
    scores: dict[int, float] = field(default_factory=dict)  # score of every eligible candidate


def _parse_value(name: str, text: str, kind: Any) -> Any:
    """Convert one ``key=value`` of the flag to the dataclass field's type."""
    optional = "None" in str(kind)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if "int" in str(kind):
            return int(text)
        if "float" in str(kind):
            return float(text)
        return text
    except ValueError:
        raise OptionError(OPTION, f"{name}={text!r} is not a valid {kind}") from None


def parse_selector_config(spec: str) -> SelectorConfig:
    """Parse ``"scored"`` or ``"scored:budget=4,decay=0.8,w_iou=2"`` into a :class:`SelectorConfig`."""
    policy, _, rest = spec.strip().partition(":")
    fields = {f.name: f.type for f in dataclasses.fields(SelectorConfig) if f.name != "policy"}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in fields:
            raise OptionError(OPTION, f"bad option {item!r} in {spec!r}; expected key=value with key in "
                                   f"{', '.join(fields)}")
        kwargs[name] = _parse_value(name, value.strip(), fields[name])
    return SelectorConfig(policy=policy.strip().lower(), **kwargs)


def mask_confidence(logits: torch.Tensor, uncertain_logit: float = 2.0) -> float:
    """Mean ``|sigmoid - 0.5| * 2`` over the predicted foreground and its uncertain rim; 0 if that region is empty.

    Averaging over the whole image would be dominated by easy background, so a frame with a confident background and
    a mushy object would look good; restricting to ``logit > -uncertain_logit`` measures how sure the object is.
    """
    logits = logits.detach().float()
    region = logits > -uncertain_logit
    if not bool(region.any()):
        return 0.0
    certainty = (torch.sigmoid(logits) - 0.5).abs() * 2.0
    return float(certainty[region].mean())


def mask_iou(pred_logits: torch.Tensor, gt: torch.Tensor) -> float:
    """IoU of ``pred_logits > 0`` (resized to the GT grid) with ``gt > 0.5``; 1.0 when both are empty."""
    pred = pred_logits.detach().float().reshape(-1, 1, *pred_logits.shape[-2:])[:1]
    gt = gt.detach().float().reshape(gt.shape[-2:]).to(pred.device)
    if pred.shape[-2:] != gt.shape:
        pred = F.interpolate(pred, size=gt.shape, mode="bilinear", align_corners=False)
    p = pred[0, 0] > 0
    g = gt > 0.5
    union = int((p | g).sum())
    return 1.0 if union == 0 else int((p & g).sum()) / union


def _scalar(x: Any) -> float | None:
    """Mean of a per-object tensor ([B, 1]); selection is one choice per frame for the whole batch."""
    if x is None:
        return None
    return float(torch.as_tensor(x).detach().float().mean())


class MemorySelector:
    """Chooses the memories SAM2 attends to; set as ``ICLPredictor.memory_selector``."""

    def __init__(self, config: SelectorConfig | None = None, record: bool = False):
        self.config = config or SelectorConfig()
        self.record = record  # keep every Selection in self.history (bench / analysis)
        self.history: list[Selection] = []
        self.last_selection: Selection | None = None
        self._gt: dict[int, dict[int, torch.Tensor]] = {}  # selector-level GT (attach_ground_truth(None, ...))
        self._gt_version = 0  # bumps when the selector-level GT changes, so cached GT IoUs are not reused

    @classmethod
    def from_name(cls, name: str, record: bool = False, **overrides: Any) -> "MemorySelector":
        """Build from a flag value such as ``"scored"`` or ``"scored:budget=4"``; keyword overrides win."""
        config = parse_selector_config(name)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(config, record=record)

    def __repr__(self) -> str:
        return f"MemorySelector({self.config})"

    # ------------------------------------------------------------------ ground truth (oracle)
    def attach_ground_truth(self, inference_state: dict | None, obj_id: int,
                            masks: Mapping[int, torch.Tensor]) -> None:
        """Attach GT masks ``{frame_idx: [H, W]}`` of one object, for the ``oracle`` policy.

        With a state, the GT belongs to that state. With ``inference_state=None`` it is kept by the selector and
        used for every state without its own GT (for callers such as ``segment_with_support`` that build the
        state internally); frame indices are then video frames (support slices first, then the queries).
        """
        if not isinstance(masks, Mapping):
            raise Sam2ExtError("ground_truth", f"expected a dict {{frame_idx: mask}}, got {type(masks).__name__}")
        checked: dict[int, torch.Tensor] = {}
        for t, m in masks.items():
            m = torch.as_tensor(m)
            if m.dim() != 2:
                raise Sam2ExtError("ground_truth", f"mask of frame {t} has shape {tuple(m.shape)}, expected [H, W]")
            checked[int(t)] = m.detach()
        if inference_state is None:
            self._gt[obj_id] = checked
            self._gt_version += 1
        else:
            inference_state.setdefault(_GT_KEY, {})[obj_id] = checked
            inference_state.pop(_CACHE_KEY, None)

    # ------------------------------------------------------------------ the hook
    def select(self, model: Any, inference_state: dict | None, output_dict: dict, frame_idx: int,
               num_frames: int | None, track_in_reverse: bool = False) -> dict:
        """Return the ``output_dict`` view SAM2 should read for ``frame_idx`` (see the module docstring)."""
        cfg = self.config
        cond = output_dict["cond_frame_outputs"]
        if len(cond) == 0 or model.num_maskmem == 0:
            return output_dict  # an initial conditioning frame: SAM2 reads no memory
        if cfg.policy == "recency":
            # note what SAM2 itself will read (its non-conditioning slots), for analysis
            non_cond = output_dict["non_cond_frame_outputs"]
            slots = [k for k in self.slot_keys(model, frame_idx, track_in_reverse) if k in non_cond]
            self._remember(Selection(self._find_obj_idx(inference_state, output_dict), frame_idx,
                                     sorted(cond), slots))
            return output_dict  # official behaviour, bit for bit
        n_slots = model.num_maskmem - 1
        budget = n_slots if cfg.budget is None else cfg.budget
        if budget > n_slots:
            raise OptionError(OPTION, f"budget {budget} exceeds the model's num_maskmem - 1 = {n_slots} memory slots")
        obj_idx = self._find_obj_idx(inference_state, output_dict)
        gt = self._ground_truth(inference_state, obj_idx) if cfg.policy == "oracle" else None

        selected_cond, unselected_cond = select_closest_cond_frames(frame_idx, cond, model.max_cond_frames_in_attn)
        candidates = self._candidates(output_dict["non_cond_frame_outputs"], unselected_cond, frame_idx,
                                      track_in_reverse)
        cache = self._cache(inference_state, obj_idx)
        for t in [t for t in cache if t not in output_dict["non_cond_frame_outputs"] and t not in cond]:
            del cache[t]  # memories pruned from the bank (keep_history): let their tensors go
        scores: dict[int, float] = {}
        for t, out in candidates.items():
            score = self._score(out, t, frame_idx, gt, cache)
            if score is not None and (cfg.min_score is None or score >= cfg.min_score):
                scores[t] = score
        # highest score first; ties go to the more recent memory, then to the lower frame id (deterministic)
        ranked = sorted(scores, key=lambda t: (-scores[t], abs(frame_idx - t), t))
        def by_recency(frames: list[int]) -> list[int]:
            return sorted(frames, key=lambda t: abs(frame_idx - t))

        chosen = by_recency(ranked[:budget])
        slots = self.slot_keys(model, frame_idx, track_in_reverse)
        non_cond = {slot: candidates[t] for slot, t in zip(slots, chosen)}
        # object pointers: SAM2 also reads keys frame_idx -/+ 1 .. that are no memory slot; fill them by rank
        ptr_keys = self._pointer_only_keys(model, frame_idx, num_frames, track_in_reverse, slots)
        n_extra = len(ptr_keys)
        if cfg.pointers is not None:
            n_extra = min(n_extra, max(cfg.pointers - len(chosen), 0))
        extra = by_recency(ranked[budget:budget + n_extra])
        for key, t in zip(ptr_keys, extra):
            non_cond[key] = {"obj_ptr": candidates[t]["obj_ptr"]}
        view = {"cond_frame_outputs": dict(selected_cond), "non_cond_frame_outputs": non_cond}
        self._remember(Selection(obj_idx, frame_idx, sorted(selected_cond), chosen, pointer_frames=extra,
                                 scores=scores))
        return view

    @staticmethod
    def _pointer_only_keys(model: Any, frame_idx: int, num_frames: int | None, reverse: bool,
                           slots: list[int]) -> list[int]:
        """Keys SAM2 reads object pointers from (t_diff = 1, 2, ...) that are not memory slots, nearest first."""
        if not getattr(model, "use_obj_ptrs_in_encoder", True):
            return []
        max_ptrs = model.max_obj_ptrs_in_encoder if num_frames is None else min(num_frames,
                                                                                 model.max_obj_ptrs_in_encoder)
        keys = []
        for t_diff in range(1, max_ptrs):
            t = frame_idx + t_diff if reverse else frame_idx - t_diff
            if t < 0 or (num_frames is not None and t >= num_frames):
                break  # SAM2 stops reading pointers here too
            if t not in slots:
                keys.append(t)
        return keys

    def _remember(self, sel: Selection) -> None:
        self.last_selection = sel
        if self.record:
            self.history.append(sel)

    def history_needed(self) -> int | None:
        """How many frames behind the current one this selector may pick from (None = all of them).

        A caller bounding the bank with ``state["keep_history"]`` should keep
        ``max(model.min_exact_history(), this)`` frames (all if None), or the scored/oracle choice shrinks.
        ``recency`` needs nothing beyond what SAM2 itself reads (0).
        """
        return 0 if self.config.policy == "recency" else self.config.window

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def slot_keys(model: Any, frame_idx: int, track_in_reverse: bool) -> list[int]:
        """The bank keys SAM2 reads for memory slots t_rel = 1 .. num_maskmem-1 (its own strided addressing)."""
        stride = 1 if model.training else model.memory_temporal_stride_for_eval
        sign = -1 if track_in_reverse else 1
        keys = []
        for t_rel in range(1, model.num_maskmem):
            if t_rel == 1:
                keys.append(frame_idx - sign)
            elif not track_in_reverse:
                keys.append(((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride)
            else:
                keys.append(-(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride)
        return keys

    def _candidates(self, non_cond: dict, unselected_cond: dict, frame_idx: int, reverse: bool) -> dict:
        """Stored memories on the already-tracked side of ``frame_idx`` (within ``window``)."""
        pool = {**unselected_cond, **non_cond}
        win = self.config.window
        out = {}
        for t, mem in pool.items():
            dist = (t - frame_idx) if reverse else (frame_idx - t)
            if dist >= 1 and (win is None or dist <= win) and mem is not None and "maskmem_features" in mem:
                out[t] = mem
        return out

    def _score(self, out: dict, t: int, frame_idx: int, gt: dict | None, cache: dict) -> float | None:
        """Score one memory; None = not eligible as memory."""
        cfg = self.config
        key = t
        hit = cache.get(key)
        if hit is None or hit[0] is not out.get("pred_masks"):
            hit = (out.get("pred_masks"), self._quality_terms(out, t, gt))
            cache[key] = hit
        terms = hit[1]
        if cfg.policy == "oracle":
            return terms["gt_iou"]
        obj_logit = terms["obj_logit"]
        if cfg.min_object_score is not None and obj_logit is not None and obj_logit < cfg.min_object_score:
            return None
        weighted = [(cfg.w_conf, terms["conf"]), (cfg.w_iou, terms["iou"]),
                    (cfg.w_obj, None if obj_logit is None else 1.0 / (1.0 + math.exp(-obj_logit))),
                    (cfg.w_recency, cfg.decay ** (abs(frame_idx - t) - 1))]
        weighted = [(w, v) for w, v in weighted if v is not None]
        total = sum(w for w, _ in weighted)
        return 0.0 if total == 0 else sum(w * v for w, v in weighted) / total

    def _quality_terms(self, out: dict, t: int, gt: dict | None) -> dict[str, float | None]:
        """Frame-intrinsic terms (cached: they do not change while the memory stays in the bank)."""
        logits = out.get("pred_masks")
        iou = _scalar(out.get("iou_pred"))
        terms: dict[str, float | None] = {
            "conf": None if logits is None else mask_confidence(logits, self.config.uncertain_logit),
            "iou": None if iou is None else min(max(iou, 0.0), 1.0),
            "obj_logit": _scalar(out.get("object_score_logits")),
            "gt_iou": None,
        }
        if gt is not None:
            if t not in gt:
                raise Sam2ExtError("ground_truth", f"oracle needs a GT mask for frame {t}; attached frames: "
                                                 f"{sorted(gt)[:5]}{'...' if len(gt) > 5 else ''}")
            if logits is None:
                raise Sam2ExtError("ground_truth", f"memory of frame {t} has no pred_masks to compare with GT")
            terms["gt_iou"] = mask_iou(logits, gt[t])
        return terms

    @staticmethod
    def _find_obj_idx(inference_state: dict | None, output_dict: dict) -> int | None:
        """Which object this bank belongs to (sam2 1.1 keeps one bank per object)."""
        if not inference_state:
            return None
        for idx, bank in inference_state.get("output_dict_per_obj", {}).items():
            if bank is output_dict:
                return idx
        per_obj = inference_state.get("output_dict_per_obj", {})
        return next(iter(per_obj)) if len(per_obj) == 1 else None

    def _ground_truth(self, inference_state: dict | None, obj_idx: int | None) -> dict:
        gts = {**self._gt, **(inference_state or {}).get(_GT_KEY, {})}
        obj_id = None
        if inference_state is not None and obj_idx is not None:
            obj_id = inference_state.get("obj_idx_to_id", {}).get(obj_idx, obj_idx)
        if obj_id not in gts:
            raise OptionError(OPTION, f"policy 'oracle' needs ground truth: call "
                                   f"selector.attach_ground_truth(state, obj_id={obj_id}, masks) before propagating")
        return gts[obj_id]

    def _cache(self, inference_state: dict | None, obj_idx: int | None) -> dict:
        """Per-state, per-object cache of quality terms, so scoring stays O(1) per stored memory per frame."""
        if inference_state is None:
            return {}
        per_policy = inference_state.setdefault(_CACHE_KEY, {})
        key = (self.config.policy, self.config.uncertain_logit, obj_idx, id(self), self._gt_version)
        return per_policy.setdefault(key, {})
