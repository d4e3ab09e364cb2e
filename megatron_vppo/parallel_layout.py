"""Which parallel layouts are legal for a model — one function shared by the trainer and the tuner.

Kept free of torch.distributed so it runs before any process group exists (and in the tuner,
which never starts one).
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message names the rule and the fix."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per rank (None = no interleaving)
    cp: int = 1
    dp: int = 1
    sp: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def world_size(self) -> int:
        return self.model_parallel_size * self.dp


def validate_layout(
    layout: Layout,
    *,
    world_size: int | None = None,
    num_attention_heads: int,
    num_query_groups: int,
    num_layers: int,
    vision_num_heads: int | None = None,
    te_available: bool = False,
) -> None:
    """Raise LayoutError naming the first rule the layout breaks (no process-group work needed)."""
    for name in ("tp", "pp", "cp", "dp"):
        v = getattr(layout, name)
        if not isinstance(v, int) or v < 1:
            raise LayoutError(f"{name}={v!r}: parallel sizes must be integers >= 1")
    if world_size is not None and world_size != layout.world_size:
        raise LayoutError(
            f"world size {world_size} != tp*pp*cp*dp = {layout.tp}*{layout.pp}*{layout.cp}*{layout.dp}"
            f" = {layout.world_size}; launch {layout.world_size} processes or change the sizes"
            f" (dp is derived as world_size // (tp*pp*cp) when not set)"
        )
    if num_attention_heads % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide num_attention_heads={num_attention_heads};"
            f" pick tp from {divisors(num_attention_heads)}"
        )
    # Megatron-Core splits the KV heads (query groups) over TP; it cannot replicate them.
    if layout.tp > num_query_groups:
        raise LayoutError(
            f"tp={layout.tp} > num_key_value_heads={num_query_groups}: Megatron-Core cannot replicate"
            f" KV heads across tensor-parallel ranks; pick tp from {divisors(num_query_groups)}"
        )
    if num_query_groups % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide num_key_value_heads={num_query_groups};"
            f" pick tp from {divisors(num_query_groups)}"
        )
    if vision_num_heads is not None and vision_num_heads % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide the vision tower's num_heads={vision_num_heads}"
        )
    if layout.pp > num_layers:
        raise LayoutError(f"pp={layout.pp} > num_layers={num_layers}: every stage needs a layer")
    if num_layers % layout.pp:
        raise LayoutError(
            f"pp={layout.pp} does not divide num_layers={num_layers}; pick pp from {divisors(num_layers)}"
        )
    if layout.vpp is not None:
        if layout.vpp < 1:
            raise LayoutError(f"vpp={layout.vpp}: must be >= 1 or unset")
        if layout.vpp > 1 and layout.pp < 2:
            raise LayoutError("virtual pipeline (vpp > 1) needs pp >= 2")
        if num_layers % (layout.pp * layout.vpp):
            raise LayoutError(
                f"num_layers={num_layers} is not divisible by pp*vpp={layout.pp * layout.vpp}"
            )
    if layout.sp and layout.tp == 1:
        raise LayoutError("sequence_parallel needs tp > 1 (it splits activations over the TP group)")
    if layout.cp > 1:
        # Megatron would build CP groups, but nothing here splits a sequence over them: the passes
        # feed every CP rank the whole padded batch (no per-rank sequence chunks, no packed THD
        # batches with cu_seqlens), so each rank would count every token cp times.
        missing = "sequence splitting over CP ranks (packed sequences)"
        if not te_available:
            missing += " and Transformer Engine attention (GPU)"
        raise LayoutError(
            f"cp={layout.cp}: context parallel is not supported yet — the trainer lacks {missing}; "
            f"set parallel.cp=1 (long sequences: raise parallel.tp with parallel.sp=true, or model.recompute=true)"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
