"""Qwen3-VL (dense) on Megatron-Core: config mapping, interleaved M-RoPE, vision tower with DeepStack
mergers, model, weights, tiny model.

The rest of the package reaches it only through `spec.py` (`SPEC`, registered in models/__init__.py).
Shared pieces come from models/common/ (layer specs, packed attention, run-time config) and from the
Qwen2.5-VL folder where the two families agree exactly (the M-RoPE index for images, the vision
tower's 2-D rotary and its TP layer spec, the tokenizer of the tiny model).
"""
