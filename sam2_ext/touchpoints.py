"""Where this library touches ``sam2``'s internals: every private method it overrides, every class it swaps or
method it shadows at run time, every helper it calls, with the signature it was written against (``sam2==1.1.0``).

Why a table: these are the places a ``sam2`` release can break without an import error. ``tests/test_touchpoints.py``
compares each signature with the installed ``sam2`` and fails naming the method; it also fails when a class of this
library overrides a private ``sam2`` method that is not listed here. ``docs/CONTRACTS.md`` explains each one.
"""
from __future__ import annotations

#: (module, class or None, attribute) -> (signature in sam2 1.1.0, what this library does with it)
TOUCHPOINTS: dict[tuple[str, str | None, str], tuple[str, str]] = {
    ("sam2.sam2_video_predictor", "SAM2VideoPredictor", "_get_image_feature"): (
        "(self, inference_state, frame_idx, batch_size)",
        "overridden (StoredFeatures, ICLPredictor): stored encoder outputs, lazy frame sources"),
    ("sam2.sam2_video_predictor", "SAM2VideoPredictor", "_run_single_frame_inference"): (
        "(self, inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame, point_inputs, mask_inputs, "
        "reverse, run_mem_encoder, prev_sam_mask_logits=None)",
        "overridden (ICLPredictor): keeps the decoder's raw candidate masks and predicted IoU per frame"),
    ("sam2.modeling.sam2_base", "SAM2Base", "_track_step"): (
        "(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes, "
        "point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse, prev_sam_mask_logits)",
        "overridden (MaskPriors, ICLPredictor): mask priors as dense prompts; all objects of a frame as one batch"),
    ("sam2.modeling.sam2_base", "SAM2Base", "_prepare_memory_conditioned_features"): (
        "(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes, "
        "output_dict, num_frames, track_in_reverse=False)",
        "overridden (ICLPredictor): the memory selector's view of the bank; padded, key-masked memories per object"),
    ("sam2.modeling.sam2_base", "SAM2Base", "_forward_sam_heads"): (
        "(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None, "
        "multimask_output=False)",
        "overridden (MaskPriors): the prior's residual added to the decoder's logits"),
    ("sam2.modeling.sam.transformer", "RoPEAttention", "forward"): (
        "(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor",
        "class swapped at run time (batching.enable_key_masks: __class__ = KeyMaskedRoPEAttention, reads "
        "freqs_cis, rope_k_repeat, dropout_p)"),
    ("sam2.modeling.sam.transformer", "Attention", "_recombine_heads"): (
        "(self, x: torch.Tensor) -> torch.Tensor", "called by KeyMaskedRoPEAttention.forward"),
    ("sam2.modeling.memory_attention", "MemoryAttention", "forward"): (
        "(self, curr: torch.Tensor, memory: torch.Tensor, curr_pos: Optional[torch.Tensor] = None, "
        "memory_pos: Optional[torch.Tensor] = None, num_obj_ptr_tokens: int = 0)",
        "shadowed on the instance for one call (batching.capture_memory_inputs records its arguments)"),
    ("sam2.modeling.position_encoding", None, "apply_rotary_enc"): (
        "(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, repeat_freqs_k: bool = False)",
        "called by KeyMaskedRoPEAttention.forward"),
    ("sam2.modeling.sam.mask_decoder", "MaskDecoder", "predict_masks"): (
        "(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor, "
        "dense_prompt_embeddings: torch.Tensor, repeat_image: bool, high_res_features: Optional[List[torch.Tensor]] "
        "= None) -> Tuple[torch.Tensor, torch.Tensor]",
        "its run-time read of pred_obj_scores is switched off for one call (litemedsam.sam_decoder: SAM's decoder "
        "path, no object-score token)"),
    ("sam2.modeling.sam2_utils", None, "select_closest_cond_frames"): (
        "(frame_idx, cond_frame_outputs, max_cond_frame_num)", "called by the memory selector"),
}
