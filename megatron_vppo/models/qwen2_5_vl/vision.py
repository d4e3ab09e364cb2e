"""Qwen2.5-VL vision tower built from Megatron-Core transformer layers, TP-sharded like the LM.

    pixel_values [N, C*T*P*P] (flattened patches, merge-block order, as the Qwen2-VL processor emits)
      -> Conv3d patch embed (no bias)                                     [N, D]
      -> reorder merge units into attention-window order (window_index)
      -> depth x TransformerLayer (RMSNorm, QKV+bias, 2-D rotary, SwiGLU+bias); blocks listed in
         `fullatt_block_indexes` attend over each whole frame, the others inside windows — both as
         packed `thd` segments (cu_seqlens) through PackedSeqAttention
      -> patch merger: RMSNorm, 2x2 merge, Column/RowParallel MLP with GELU    [N/4, out_hidden]
      -> undo the window order, so rows follow HF's `model.visual(...)` output.

The tower runs without sequence parallelism whatever the LM does: its config is its own
(`vision_transformer_config` turns SP, PP, CP and fused RoPE off), activations are [N, 1, D] replicated
over the TP group, and the output is replicated on every TP rank — the LM scatters it into its
embeddings (and splits it for SP) itself. The vision MLP's width is padded with zeros up to a multiple
of TP (Qwen2.5-VL's 3420 is not divisible by 8); the weight adapter adds and strips the padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
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

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _hf_get(cfg: dict, key: str, default=None):
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


def padded_ffn_size(intermediate_size: int, tp: int) -> int:
    """Vision MLP width rounded up to a multiple of TP (zero rows/cols are exact: silu(0)*0 = 0)."""
    return -(-intermediate_size // tp) * tp


def vision_transformer_config(hf_vision_cfg: dict, base_kwargs: dict) -> TransformerConfig:
    """The tower's TransformerConfig: shapes from HF's `vision_config`, runtime knobs (dtype, init,
    TP size, fusions) from the LM's TransformerConfig kwargs (INHERITED_KEYS; the rest is ignored)."""
    hidden = int(_hf_get(hf_vision_cfg, "hidden_size"))
    heads = int(_hf_get(hf_vision_cfg, "num_heads"))
    act = _hf_get(hf_vision_cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(
            f"vision hidden_size {hidden} / num_heads {heads} must give a head_dim divisible by 4 (2-D rotary)"
        )
    tp = int(base_kwargs.get("tensor_model_parallel_size", 1))
    if heads % tp:
        raise ValueError(f"tp={tp} does not divide the vision tower's num_heads={heads}; choose tp dividing it")
    kw = {k: base_kwargs[k] for k in INHERITED_KEYS if k in base_kwargs}
    kw.update(
        num_layers=int(_hf_get(hf_vision_cfg, "depth")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=padded_ffn_size(int(_hf_get(hf_vision_cfg, "intermediate_size")), tp),
        gated_linear_unit=True,
        activation_func=_ACTIVATIONS[act],
        add_bias_linear=True,
        add_qkv_bias=True,
        normalization="RMSNorm",
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
    """One vision block as a Megatron layer spec. The TE variant keeps the local parameter names
    (separate norms, unfused linears) so the weight adapter serves both."""
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


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if torch.is_tensor(grid_thw) else list(grid_thw)
    return [tuple(int(v) for v in r) for r in rows]


def frame_cu_seqlens(grid_thw, device=None) -> torch.Tensor:
    """Full attention: one segment per frame (h*w patches), int32 cumulative boundaries."""
    lens = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32).to(device)


def patch_positions(grid_thw, merge: int, device=None) -> torch.Tensor:
    """[N, 2] (row, col) of every patch, in the processor's merge-block order, repeated per frame."""
    out = []
    for t, h, w in _grid_list(grid_thw):
        by, bx, iy, ix = torch.meshgrid(
            torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge), indexing="ij"
        )
        pos = torch.stack([(by * merge + iy).flatten(), (bx * merge + ix).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out).to(device)


def window_index(grid_thw, merge: int, window_size: int, patch_size: int, device=None):
    """Order of merge units for window attention, and the windows' cu_seqlens (in patches).

    Windows are `window_size` pixels square, tiled per frame from the top-left; units are sorted by
    (image, frame, window row, window col, row in window, col in window). Returns (index [N/merge²]
    long, cu_window_seqlens int32): unit `index[j]` of the input goes to position j."""
    vw = window_size // merge // patch_size
    if vw < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merge unit ({merge}x{patch_size} px)")
    index, lens, offset = [], [], 0
    for t, h, w in _grid_list(grid_thw):
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // vw), -(-gw // vw)
        ti, yi, xi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        win = ((ti * nwh + yi // vw) * nww + xi // vw).flatten()
        key = win * vw * vw + ((yi % vw) * vw + xi % vw).flatten()
        index.append(torch.argsort(key) + offset)
        counts = torch.bincount(win, minlength=t * nwh * nww)
        lens.append(counts[counts > 0])
        offset += t * gh * gw
    cu = F.pad(torch.cat(lens).cumsum(0) * merge * merge, (1, 0)).to(torch.int32)
    return torch.cat(index).to(device), cu.to(device)


def rotary_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[N, 2] (row, col) -> [N, head_dim] angles: [row·f, col·f] twice, f over head_dim/4 frequencies
    (HF's axial vision rotary; rotate-half over the whole head)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    f = (positions.float()[..., None] * inv_freq).flatten(1)  # [N, half] = [row freqs, col freqs]
    return torch.cat([f, f], dim=-1)


def _packed(cu: torch.Tensor) -> PackedSeqParams:
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


# ---- modules ----


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over already-flattened patches, no bias (as HF)."""

    def __init__(self, in_channels: int, temporal: int, patch: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.shape = (in_channels, temporal, patch, patch)
        k = (temporal, patch, patch)
        self.proj = torch.nn.Conv3d(in_channels, hidden, kernel_size=k, stride=k, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(-1, *self.shape).to(self.proj.weight.dtype)).flatten(1)


class PatchMerger(MegatronModule):
    """RMSNorm over D, concatenate each merge unit (merge² patches) -> Column/Row-parallel MLP."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int):
        super().__init__(config=config)
        self.in_size = config.hidden_size * merge * merge
        self.ln_q = torch.nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.in_size, self.in_size, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.in_size, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, D] in window order -> [N/merge², 1, out_hidden]."""
        h = self.ln_q(x).reshape(-1, 1, self.in_size)
        h, _ = self.linear_fc1(h)
        h, _ = self.linear_fc2(F.gelu(h))
        return h


class Qwen25VisionModel(MegatronModule):
    """Qwen2.5-VL's vision encoder + merger; forward(pixel_values, image_grid_thw) -> [N/4, out_hidden]."""

    def __init__(
        self, hf_vision_cfg: dict, base_kwargs: dict, layer_spec: ModuleSpec | None = None, use_te: bool = False,
        tp_group=None,
    ):
        config = vision_transformer_config(hf_vision_cfg, base_kwargs)
        super().__init__(config=config)
        self.tp_group = tp_group  # distributed.ParallelDims.tp_group (None: one TP rank)
        c = hf_vision_cfg
        self.merge = int(_hf_get(c, "spatial_merge_size", 2))
        self.patch_size = int(_hf_get(c, "patch_size", 14))
        self.window_size = int(_hf_get(c, "window_size", 112))
        self.fullatt_block_indexes = tuple(int(i) for i in _hf_get(c, "fullatt_block_indexes", []))
        self.head_dim = config.kv_channels
        self.theta = rope_theta(c)
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside depth {config.num_layers}")

        self.patch_embed = PatchEmbed(
            in_channels(c), int(_hf_get(c, "temporal_patch_size", 2)),
            self.patch_size, config.hidden_size, config.params_dtype,
        )
        if config.perform_initialization:
            config.init_method(self.patch_embed.proj.weight.data)
        spec = layer_spec or vision_layer_spec(config.ffn_hidden_size, use_te=use_te)
        self.blocks = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        self.merger = PatchMerger(config, int(_hf_get(c, "out_hidden_size")), self.merge)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        grid = _grid_list(image_grid_thw)
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.dim() != 2 or pixel_values.size(0) != n:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw {grid} needs {n} "
                "patch rows; pass the processor's flattened patches and their grid together"
            )
        if any(h % self.merge or w % self.merge for _, h, w in grid):
            raise ValueError(f"image_grid_thw {grid}: h and w must be multiples of spatial_merge_size {self.merge}")
        dev, unit = pixel_values.device, self.merge * self.merge
        win_idx, cu_win = window_index(grid, self.merge, self.window_size, self.patch_size, dev)
        full, windowed = _packed(frame_cu_seqlens(grid, dev)), _packed(cu_win)

        def to_windows(x):  # permute merge units (groups of merge² consecutive rows) into window order
            return x.view(n // unit, unit, -1)[win_idx].reshape(n, -1)

        x = to_windows(self.patch_embed(pixel_values)).unsqueeze(1)  # [N, 1, D]
        freqs = to_windows(rotary_freqs(patch_positions(grid, self.merge, dev), self.head_dim, self.theta))
        freqs = freqs[:, None, None, :]  # [N, 1, 1, head_dim]: Megatron's thd rotary, exact positions
        for i, layer in enumerate(self.blocks):
            psp = full if i in self.fullatt_block_indexes else windowed
            x, _ = layer(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=psp)
        out = self.merger(x).squeeze(1)
        return out[torch.argsort(win_idx)]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view: each block under `blocks.{i}.` with its own TP sharding.

        The TP group (`ParallelDims.tp_group`, given at construction) must be set at TP > 1: without it
        Megatron gives TP-replicated tensors (the patch embedding, norms) the same replica id on every
        TP rank and the save is rejected."""
        tp_group = self.tp_group
        sd = {}
        for name, child in self.named_children():
            if name == "blocks":
                for i, layer in enumerate(child):
                    sd.update(sharded_state_dict_default(layer, f"{prefix}blocks.{i}.", sharded_offsets, metadata,
                                                         tp_group=tp_group))
            else:
                sd.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=tp_group))
        return sd
