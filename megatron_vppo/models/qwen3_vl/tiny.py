"""A tiny, randomly initialised Qwen3-VL written as an offline Hugging Face directory.

The real architecture at toy widths: QK-norm, an explicit head_dim different from hidden/heads,
interleaved M-RoPE with an uneven `mrope_section` (so the t/h/w interleave has a tail), a 16-px
vision tower with a learned position table smaller than the images' grids (so it is interpolated),
DeepStack on three blocks feeding LM layers 0-2 of 4 (a PP2 split puts layer 2 on stage 1), and an
MLP width that TP2 must pad. Tokenizer, chat template, seeded init and generation config are
models/common/tiny_files.py's, as for the tiny Qwen2.5-VL (same special tokens).
"""
from __future__ import annotations

from pathlib import Path

from megatron_vppo.models.common.tiny_files import write_tiny_model


def tiny_config_dict(vocab_size: int, special_ids: dict[str, int], tie_word_embeddings: bool = False,
                     **overrides) -> dict:
    """The tiny Qwen3-VL config (nested). `overrides` may name top-level keys or `text_config` /
    `vision_config` dicts merged into the defaults."""
    text = dict(
        model_type="qwen3_vl_text", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.02, use_cache=True,
        attention_bias=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 3, 3],
                         "mrope_interleaved": True},
        bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"], tie_word_embeddings=tie_word_embeddings, dtype="float32",
    )
    vision = dict(
        model_type="qwen3_vl_vision", depth=3, hidden_size=32, num_heads=2, intermediate_size=51,
        hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2], initializer_range=0.02,
    )
    overrides = dict(overrides)
    text_over = dict(overrides.pop("text_config", {}) or {})
    text.update(text_over)
    if "rope_parameters" not in text_over:  # keep Qwen3-VL's t/h/w proportions ([24, 20, 20] of 64)
        half = text["head_dim"] // 2
        hw = half * 5 // 16
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[half - 2 * hw, hw, hw])
    vision.update(overrides.pop("vision_config", {}) or {})
    vision["out_hidden_size"] = text["hidden_size"]
    section = text["rope_parameters"]["mrope_section"]
    if sum(section) * 2 != text["head_dim"]:
        raise ValueError(f"mrope_section {section} sums to {sum(section)} but head_dim/2 = {text['head_dim'] // 2};"
                         " override text_config.rope_parameters.mrope_section to match")
    cfg = dict(
        architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", text_config=text,
        vision_config=vision, image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings, dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def make_tiny_model(out_dir, seed: int = 0, tokenizer: str = "bpe", tie_word_embeddings: bool = False,
                    **overrides) -> Path:
    """Write a tiny random Qwen3-VL HF directory to `out_dir` and return its path (loads offline with
    `Qwen3VLForConditionalGeneration.from_pretrained`, `AutoTokenizer` and the image processor)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return write_tiny_model(out_dir, seed=seed, tokenizer=tokenizer, tie_word_embeddings=tie_word_embeddings,
                            overrides=overrides, config_dict=tiny_config_dict, config_class=Qwen3VLConfig,
                            model_class=Qwen3VLForConditionalGeneration, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5))
