"""What the Qwen-VL vision towers share: the tower's own TransformerConfig, the TP layer spec of one
block, the 2-D (row, col) rotary, patch positions and per-frame packing, the Conv3d patch embedding, the
merger's Column/Row-parallel MLP, the input checks and the distributed-checkpoint view.

Every tower runs without sequence parallelism whatever the LM does: its config is its own
(`vision_transformer_config` turns SP, PP, CP and fused RoPE off), activations are [N, 1, D] replicated
over the TP group, and the output is replicated on every TP rank. Each model folder's `vision.py`
composes these with what is its own (window attention, learned position tables, DeepStack).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_vppo.models.common.packed_attention import PackedSeqAttention

# TransformerConfig fields the vision tower takes from the LM's config; everything else is its own.
INHERITED_KEYS = (
    "tensor_model_parallel_size",
    "params_dtype",
    "bf16",
    "fp16",
    "use_cpu_initialization",
    "perform_initialization",
    "init_method_std",
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "attention_softmax_in_fp32",
    "deterministic_mode",
    "timers",
    "expert_model_parallel_size",
)

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def hf_get(cfg: dict, key: str, default=None):
    if key in cfg:
        return cfg[key]
    if default is None:
        raise KeyError(f"vision config has no {key!r}; pass config.json's `vision_config` dict")
    return default


def rope_theta(hf_vision_cfg: dict) -> float:
    rp = hf_vision_cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", hf_vision_cfg.get("rope_theta", 10000.0)))


def in_channels(hf_vision_cfg: dict) -> int:
    """transformers 5.x says `in_channels`; Qwen's released 4.x configs say `in_chans`."""
    return int(hf_vision_cfg.get("in_channels", hf_vision_cfg.get("in_chans", 3)))


def vision_transformer_config(hf_vision_cfg: dict, base_kwargs: dict, *, ffn_size: Callable[[int, int], int],
                              gated: bool, normalization: str, default_act: str) -> TransformerConfig:
    """The tower's TransformerConfig: shapes from HF's `vision_config`, runtime knobs (dtype, init,
    TP size, fusions) from the LM's TransformerConfig kwargs (INHERITED_KEYS; the rest is ignored).
    The family's MLP (`gated`, `ffn_size(intermediate_size, tp)`: its zero-padded width) and norm."""
    hidden = int(hf_get(hf_vision_cfg, "hidden_size"))
    heads = int(hf_get(hf_vision_cfg, "num_heads"))
    act = hf_get(hf_vision_cfg, "hidden_act", default_act)
    if act not in ACTIVATIONS:
        raise ValueError(f"vision hidden_act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(
            f"vision hidden_size {hidden} / num_heads {heads} must give a head_dim divisible by 4 (2-D rotary)"
        )
    tp = int(base_kwargs.get("tensor_model_parallel_size", 1))
    if heads % tp:
        raise ValueError(f"tp={tp} does not divide the vision tower's num_heads={heads}; choose tp dividing it")
    kw = {k: base_kwargs[k] for k in INHERITED_KEYS if k in base_kwargs}
    kw.update(
        num_layers=int(hf_get(hf_vision_cfg, "depth")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=ffn_size(int(hf_get(hf_vision_cfg, "intermediate_size")), tp),
        gated_linear_unit=gated,
        activation_func=ACTIVATIONS[act],
        add_bias_linear=True,
        add_qkv_bias=True,
        normalization=normalization,
        layernorm_epsilon=1e-6,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        apply_rope_fusion=False,  # TE's fused thd RoPE restarts positions per segment; ours are 2-D
        rotary_interleaved=False,
        tp_comm_overlap=False,
    )
    return TransformerConfig(**kw)


def vision_layer_spec(ffn_hidden_size: int, use_te: bool = False) -> ModuleSpec:
    """One vision block as a Megatron layer spec (the norm is the config's `normalization`). The TE
    variant keeps the local parameter names (separate norms, unfused linears) so the weight adapter
    serves both."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        col, row, norm, core = TEColumnParallelLinear, TERowParallelLinear, TENorm, TEDotProductAttention
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        col, row, norm, core = ColumnParallelLinear, RowParallelLinear, WrappedTorchNorm, PackedSeqAttention
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=core, linear_proj=row, q_layernorm=IdentityOp, k_layernorm=IdentityOp
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": ffn_hidden_size},
                submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


# ---- pure index / position functions (grid_thw -> tensors), HF semantics ----


def grid_list(grid_thw) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else list(grid_thw)
    return [tuple(int(v) for v in r) for r in rows]


def check_pixels(pixel_values: torch.Tensor, grid: list[tuple[int, int, int]], merge: int) -> int:
    """The patch rows `grid` needs (= pixel_values' rows), or a one-line error naming the mismatch."""
    n = sum(t * h * w for t, h, w in grid)
    if pixel_values.dim() != 2 or pixel_values.size(0) != n:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw {grid} needs {n} "
            "patch rows; pass the processor's flattened patches and their grid together"
        )
    if any(h % merge or w % merge for _, h, w in grid):
        raise ValueError(f"image_grid_thw {grid}: h and w must be multiples of spatial_merge_size {merge}")
    return n


def frame_cu_seqlens(grid_thw, device=None) -> torch.Tensor:
    """Full attention: one segment per frame (h*w patches), int32 cumulative boundaries."""
    lens = [h * w for t, h, w in grid_list(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32).to(device)


def patch_positions(grid_thw, merge: int, device=None) -> torch.Tensor:
    """[N, 2] (row, col) of every patch, in the processor's merge-block order, repeated per frame."""
    out = []
    for t, h, w in grid_list(grid_thw):
        by, bx, iy, ix = torch.meshgrid(
            torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge), indexing="ij"
        )
        pos = torch.stack([(by * merge + iy).flatten(), (bx * merge + ix).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out).to(device)


def rotary_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[N, 2] (row, col) -> [N, head_dim] angles: [row·f, col·f] twice, f over head_dim/4 frequencies
    (HF's axial vision rotary; rotate-half over the whole head)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    f = (positions.float()[..., None] * inv_freq).flatten(1)  # [N, half] = [row freqs, col freqs]
    return torch.cat([f, f], dim=-1)


def packed(cu: torch.Tensor) -> PackedSeqParams:
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


# ---- modules ----


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over already-flattened patches (`bias` as the family's HF)."""

    def __init__(self, in_ch: int, temporal: int, patch: int, hidden: int, dtype: torch.dtype, bias: bool):
        super().__init__()
        self.shape = (in_ch, temporal, patch, patch)
        k = (temporal, patch, patch)
        self.proj = torch.nn.Conv3d(in_ch, hidden, kernel_size=k, stride=k, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(-1, *self.shape).to(self.proj.weight.dtype)).flatten(1)


class MergerMLP(MegatronModule):
    """The merger's MLP over merge units (hidden·merge² wide): Column-parallel fc1, GELU, Row-parallel
    fc2. A family's merger subclasses it and hands in its norm (registered first, as `norm_name`, so
    parameter names and order are the family's)."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int, norm_name: str,
                 norm: torch.nn.Module):
        super().__init__(config=config)
        self.in_size = config.hidden_size * merge * merge
        self.add_module(norm_name, norm)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.in_size, self.in_size, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.in_size, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """[M, 1, in_size] (normed merge units) -> [M, 1, out_hidden]."""
        h, _ = self.linear_fc1(h)
        h, _ = self.linear_fc2(F.gelu(h))
        return h


def tower_sharded_state_dict(module: MegatronModule, tp_group, listed: tuple[str, ...], prefix: str = "",
                             sharded_offsets=(), metadata=None) -> dict:
    """Distributed-checkpoint view of a tower: each element of the ModuleLists named in `listed` (the
    blocks) under `{name}.{i}.` with its own TP sharding. The TP group (`ParallelDims.tp_group`) must be
    set at TP > 1: without it Megatron gives TP-replicated tensors (the patch embedding, norms) the same
    replica id on every TP rank and the save is rejected."""
    sd = {}
    for name, child in module.named_children():
        if name in listed:
            for i, sub in enumerate(child):
                sd.update(sharded_state_dict_default(sub, f"{prefix}{name}.{i}.", sharded_offsets, metadata,
                                                     tp_group=tp_group))
        else:
            sd.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                 tp_group=tp_group))
    return sd
