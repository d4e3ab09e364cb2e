"""Qwen2.5-VL on Megatron-Core: vision tower (first stage) + GPTModel language model with M-RoPE.

One pipeline stage holds `Qwen25VLModel(pre_process, post_process)`:
* first stage: token embeddings; image features from the vision tower scattered at `<|image_pad|>`
  positions (batch-major order, as HF's `masked_scatter`); split over TP for sequence parallel;
* every stage: M-RoPE position ids from input_ids + image_grid_thw (`rope_index`), unless given;
* last stage: vocab-parallel logits [b, s, padded_vocab / tp] — never gathered. Columns past
  `vocab_size` are vocab padding: the caller masks them (their weights are zero, so they hold 0).
Intermediate stages get their hidden states through `set_input_tensor` (Megatron's schedules).
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.qwen2_5_vl.config import (
    lm_transformer_config,
    load_hf_config,
    padded_vocab_size,
    text_arch,
)
from megatron_vppo.models.common.layer_specs import lm_layer_spec
from megatron_vppo.models.qwen2_5_vl.rope_index import rope_index_for


def attention_mask_for(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[b, s] (1 = token) -> Megatron's boolean mask [b, 1, s, s] (True = masked), or None.

    Right padding needs no mask — causal attention never lets a real token see a later pad — so
    None (plain causal, the fast path) is returned then. Otherwise: causal AND key is a token; a pad
    query row additionally sees itself so softmax stays finite."""
    if attention_mask is None:
        return None
    valid = attention_mask.bool()
    lengths = valid.sum(-1, keepdim=True)
    pos = torch.arange(valid.shape[1], device=valid.device)
    if torch.equal(valid, pos[None, :] < lengths):  # every row is a prefix: right padding
        return None
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)[None]
    return ~allowed[:, None]


class Qwen25VLModel(MegatronModule):
    """Qwen2.5-VL for one pipeline stage (or VPP chunk). See the module docstring."""

    def __init__(
        self,
        hf_config,
        model_cfg: ModelConfig | None = None,
        parallel: ParallelConfig | None = None,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        with_vision: bool = True,
        config=None,
        tp_group=None,
        init_weights: bool = True,
    ):
        self.hf_config = load_hf_config(hf_config)
        model_cfg = model_cfg or ModelConfig()
        config = config or lm_transformer_config(self.hf_config, model_cfg, parallel,
                                                 perform_initialization=init_weights)
        super().__init__(config=config)
        self.arch = text_arch(self.hf_config)
        self.vocab_size = self.arch.vocab_size
        self.padded_vocab_size = padded_vocab_size(
            self.vocab_size, model_cfg.vocab_pad_multiple, config.tensor_model_parallel_size
        )
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = self.arch.tie_word_embeddings
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=lm_layer_spec(config),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=self.arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=self.arch.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=self.arch.rope_theta,
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.model_type = self.language_model.model_type
        self.vision_model = None
        if pre_process and with_vision and self.hf_config.get("vision_config"):
            from megatron_vppo.models.qwen2_5_vl.vision import INHERITED_KEYS, Qwen25VisionModel

            base = {k: getattr(config, k) for k in INHERITED_KEYS if hasattr(config, k)}
            self.vision_model = Qwen25VisionModel(dict(self.hf_config["vision_config"]), base, tp_group=tp_group)

    # Megatron's schedules call these on every model chunk.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def pipeline_seq_length(self, seq_length: int) -> int:
        """Stages exchange only the hidden states [s, b, h] (models/spec.py `ModelChunk`)."""
        return seq_length

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def position_ids(self, input_ids, image_grid_thw=None, attention_mask=None) -> torch.Tensor:
        """M-RoPE ids [3, b, s] (what every stage computes when none are passed)."""
        return rope_index_for(self.arch, input_ids, image_grid_thw, attention_mask)[0]

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """First stage: token embeddings with image features at `<|image_pad|>` -> [s, b, h] (full)."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_pad = input_ids == self.arch.image_token_id
        n_pad = int(is_pad.sum())
        if pixel_values is None:
            if n_pad:
                raise ValueError(
                    f"input_ids hold {n_pad} <|image_pad|> tokens but no pixel_values were given"
                )
            return emb
        if self.vision_model is None:
            raise ValueError("pixel_values given but this model was built without a vision tower")
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw ([num_images, 3] = t, h, w in patches)")
        feats = self.vision_model(pixel_values, image_grid_thw)
        if feats.shape[0] != n_pad:
            raise ValueError(
                f"image token mismatch: input_ids hold {n_pad} <|image_pad|> tokens but image_grid_thw"
                f" {image_grid_thw.tolist()} gives {feats.shape[0]} image features; each image needs"
                f" t*h*w/{self.arch.spatial_merge_size ** 2} pad tokens in its prompt"
            )
        emb_bsh = emb.transpose(0, 1).masked_scatter(is_pad.unsqueeze(-1), feats.to(emb.dtype))
        return emb_bsh.transpose(0, 1).contiguous()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """input_ids [b, s]; attention_mask [b, s] of 1/0 (or None). Last stage: logits
        [b, s, padded_vocab/tp]; other stages: hidden states [s(/tp with SP), b, h] for the next.

        Packed (thd): input_ids [1, T] holding segments, `packed_seq_params` (Megatron's PackedSeqParams,
        `cu_seqlens`) and each segment's own M-RoPE `position_ids` [3, 1, T]; attention stays inside a
        segment (our core attention on CPU, Transformer Engine's thd attention with the TE spec), and
        Megatron's thd RoPE maps the per-token frequencies by offset."""
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(
                f"sequence parallel splits the sequence over tp={tp} ranks: sequence length"
                f" {input_ids.shape[1]} must be a multiple of {tp}; right-pad the batch"
                f" (pad token, attention_mask 0) to a multiple of {tp}"
            )
        packed = packed_seq_params is not None
        if packed and (position_ids is None or attention_mask is not None or input_ids.shape[0] != 1):
            raise ValueError(
                "packed (thd) input is one [1, T] row with per-segment position_ids [3, 1, T] and no"
                " attention_mask; build it with train.rl_batch.collate_packed"
            )
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
        mask = attention_mask_for(attention_mask)
        if mask is not None and self.config.transformer_impl == "transformer_engine":
            # TE's causal attention ignores an arbitrary mask; refuse rather than be silently wrong.
            raise ValueError(
                "left/middle padding needs an attention mask, which the Transformer Engine layers do not"
                " take with causal masking; right-pad the batch or pass packed_seq_params (thd)"
            )
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )


def build_model_chunks(hf_config, model_cfg=None, parallel=None, *, dims=None,
                       with_vision=True, init_weights: bool = True) -> list[Qwen25VLModel]:
    """This rank's model chunk(s) (one per virtual pipeline stage), after `init_distributed`.

    `init_weights=False` skips Megatron's random initialisation (`perform_initialization`): for
    chunks whose every parameter is then loaded (HF directory, checkpoint), it is start-up time and
    a full fp32 weight pass per rank for nothing (docs/benchmarks.md).

    `dims` (distributed.ParallelDims, `init_distributed`'s result) says which chunks hold the
    first stage (embeddings, vision) and the last (output layer). Parameters are created on CPU
    (`use_cpu_initialization`) and moved to the current GPU if any."""
    if dims is None:
        raise TypeError("build_model_chunks needs dims= (the ParallelDims init_distributed returned)")
    vpp = dims.vpp or 1
    chunks = []
    for v in range(vpp):
        chunks.append(
            Qwen25VLModel(
                hf_config,
                model_cfg,
                parallel,
                pre_process=dims.first_stage and v == 0,
                post_process=dims.last_stage and v == vpp - 1,
                vp_stage=v if vpp > 1 else None,
                with_vision=with_vision,
                tp_group=dims.tp_group,
                init_weights=init_weights,
            )
        )
    if not init_weights:  # Megatron records TP sharding inside the init it skipped
        from megatron_vppo.models.common.tp_attributes import mark_tensor_parallel_weights

        mark_tensor_parallel_weights(chunks)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks
