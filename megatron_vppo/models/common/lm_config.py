"""The run-time half of a language model's Megatron `TransformerConfig`, shared by the model folders.

A model's config module maps its HF config to shape fields (layers, widths, heads, biases, norms);
everything that comes from the run instead — dtype, parallel sizes, fusions off on CPU, the layer
implementation, recompute, FP8 — is `runtime_kwargs`, so every model treats those identically.
"""
from __future__ import annotations

import torch

from megatron_vppo.config import ModelConfig, ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Round the vocabulary up so every TP rank holds an equal, `multiple`-aligned slice."""
    step = max(1, multiple) * max(1, tp)
    return -(-vocab_size // step) * step


def resolve_transformer_impl(model: ModelConfig) -> str:
    """'auto' -> transformer_engine when TE and CUDA are present, else local."""
    from megatron_vppo.distributed import te_available

    impl = model.transformer_impl
    if impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if impl == "transformer_engine":
        if not te_available():
            raise ValueError(
                "model.transformer_impl=transformer_engine needs Transformer Engine and a GPU;"
                " use transformer_impl=local (or auto) on CPU"
            )
    return impl


def runtime_kwargs(model: ModelConfig | None, parallel: ParallelConfig | None) -> dict:
    """TransformerConfig keyword arguments decided by the run config, not by the model."""
    model = model or ModelConfig()
    parallel = parallel or ParallelConfig()
    impl = resolve_transformer_impl(model)
    dtype = DTYPES[model.dtype]
    if model.fp8 is not None and impl != "transformer_engine":
        raise ValueError(
            f"model.fp8={model.fp8!r} needs Transformer Engine on a GPU; unset fp8 on CPU/local layers"
        )
    kwargs = dict(
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp not in (None, 1) else None,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        transformer_impl=impl,
        deallocate_pipeline_outputs=torch.cuda.is_available(),
    )
    if model.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    return kwargs
