"""LiteMedSAM's weights inside a SAM2 model: recognise its state dict, map its keys, load them strictly.

Why: LiteMedSAM (image encoder, SAM prompt encoder, SAM mask decoder) is the engine's medical-pretrained start.
SAM2 kept SAM's module names for the heads except the two-way transformer's MLP (``lin1``/``lin2`` became
``layers.0``/``layers.1``); the image encoder is :class:`sam2_ext.tinyvit.TinyViT` with LiteMedSAM's own names.
Every mapped key must exist in the model with its shape, and every prompt-encoder, mask-decoder and encoder key of
the model must come from the file, except the decoder parts SAM2 added (object-score token and head, high-res
convolutions). The parts LiteMedSAM lacks (memory attention, memory encoder, object pointers, ...) keep their
init; the object-score token starts at zero and the score head says "present" (final layer: weight 0, bias
:data:`PRESENT_LOGIT`), so the pretrained decoder's masks are as near LiteMedSAM's as a fourth token allows and
are never hidden by an untrained "absent" score.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sam2_ext.errors import CheckpointError
from sam2_ext.fit import fit_problems

#: LiteMedSAM's top-level parts -> the SAM2 model's
PARTS = {"image_encoder.": "image_encoder.", "prompt_encoder.": "sam_prompt_encoder.",
         "mask_decoder.": "sam_mask_decoder."}
#: SAM2's decoder parts that LiteMedSAM has no weights for (they keep their init)
SAM2_ONLY = ("sam_mask_decoder.obj_score_token.", "sam_mask_decoder.pred_obj_score_head.",
             "sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.")
#: the untrained object-score head's constant output: sigmoid(10) ~ 1, "the object is there" (as SAM2 says when it
#: predicts no object scores)
PRESENT_LOGIT = 10.0
_MLP = re.compile(r"(\.transformer\.layers\.\d+\.mlp\.)lin([12])\.")
# keys that only a LiteMedSAM file has (a SAM2 / MedSAM2 / own checkpoint names these parts otherwise)
_SIGNATURE = ("image_encoder.patch_embed.seq.0.c.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
              "mask_decoder.iou_token.weight")


def is_litemedsam(state_dict: Mapping[str, object]) -> bool:
    """A LiteMedSAM state dict: its three parts only, with their names (not SAM2's ``sam_*``)."""
    return all(k in state_dict for k in _SIGNATURE) and all(str(k).startswith(tuple(PARTS)) for k in state_dict)


def to_sam2_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LiteMedSAM's keys -> the SAM2 model's (prefixes, and the transformer MLP's ``lin1/2`` -> ``layers.0/1``)."""
    out = {}
    for key, value in state_dict.items():
        src = next(p for p in PARTS if key.startswith(p))
        new = PARTS[src] + key[len(src):]
        out[_MLP.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) - 1}.", new)] = value
    return out


def load_litemedsam(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Load a LiteMedSAM state dict into a SAM2 model with a TinyViT image encoder; a key that is missing, extra or
    of another shape is a CheckpointError naming it (and nothing is loaded)."""
    mapped = to_sam2_keys(state_dict)
    own = model.state_dict()
    parts = tuple(PARTS.values())
    wanted = [k for k in own if k.startswith(parts) and not k.startswith(SAM2_ONLY)]
    problems = fit_problems(own, mapped, wanted, "model keys not in the file", "file keys not in the model")
    if problems:
        raise CheckpointError(path, "LiteMedSAM weights do not fit the model config (they need a TinyViT config "
                                    "such as medsam_lite); " + "; ".join(problems))
    model.load_state_dict(mapped, strict=False)
    neutral_object_score(model.sam_mask_decoder)


@torch.no_grad()
def neutral_object_score(decoder: nn.Module) -> None:
    """Object-score token zero and the score head's output the constant :data:`PRESENT_LOGIT` (trainable from
    there: its final layer's input is not zero)."""
    if getattr(decoder, "pred_obj_scores", False):
        decoder.obj_score_token.weight.zero_()
        head = decoder.pred_obj_score_head
        last = head.layers[-1] if hasattr(head, "layers") else head
        last.weight.zero_()
        last.bias.fill_(PRESENT_LOGIT)


@contextmanager
def sam_decoder(model: nn.Module) -> Iterator[nn.Module]:
    """The model's mask decoder run as SAM's (LiteMedSAM's own path: no object-score token among the tokens).

    Why: SAM2's fourth output token, even at zero, takes part in the tokens' self-attention and moves the logits a
    little (measured: max |d logits| 3.8 on a disc, Dice unchanged to 3 decimals); the box baseline and the
    reference check use the exact pretrained decoder. Sets the decoder's ``pred_obj_scores`` flag off for the block.
    """
    decoder = model.sam_mask_decoder
    flag = decoder.pred_obj_scores
    decoder.pred_obj_scores = False
    try:
        yield decoder
    finally:
        decoder.pred_obj_scores = flag


def box_logits(model: nn.Module, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """LiteMedSAM's box prompt on an image embedding: boxes [B, 4] (x0, y0, x1, y1 in model-input pixels) ->
    low-res mask logits [B, 1, 4h, 4w] from the model's prompt encoder and mask decoder, run as SAM's."""
    sparse, dense = model.sam_prompt_encoder(points=None, boxes=boxes[:, None, :].float(), masks=None)
    with sam_decoder(model) as decoder:
        logits, _, _, _ = decoder(image_embeddings=embedding.expand(len(boxes), -1, -1, -1),
                                  image_pe=model.sam_prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False, repeat_image=False)
    return logits
