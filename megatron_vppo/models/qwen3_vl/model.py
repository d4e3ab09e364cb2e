"""Qwen3-VL on Megatron-Core: vision tower (first stage) + GPTModel language model with QK-norm,
interleaved M-RoPE and DeepStack.

One pipeline stage holds `Qwen3VLModel(pre_process, post_process)`:
* first stage: token embeddings with the merged image features at `<|image_pad|>` (batch-major, as
  HF's `masked_scatter`); the DeepStack features of each image token laid out densely as
  [k, s, b, h] (zero off the image tokens), split over TP like the hidden states under SP;
* every decoder layer with global index g < k adds DeepStack tensor g to its output (`DeepStackLayer`,
  the features ride the layers' `context` argument, so activation recompute sees them too); x + 0 is
  exact, so the dense add equals HF's masked add;
* pipeline parallel: a stage sends [hidden; the k DeepStack tensors] stacked along the sequence
  ([(1+k)·s, b, h], `pipeline_seq_length`), so a DeepStack layer on any stage gets its features and
  their gradient flows back to the vision tower on stage 0;
* last stage: vocab-parallel logits [b, s, padded_vocab / tp], never gathered (padding columns hold 0).
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common.layer_specs import lm_layer_spec
from megatron_vppo.models.common.lm_config import padded_vocab_size
from megatron_vppo.models.common.tp_attributes import mark_tensor_parallel_weights
from megatron_vppo.models.qwen2_5_vl.model import attention_mask_for
from megatron_vppo.models.qwen3_vl.config import lm_transformer_config, load_hf_config, text_arch
from megatron_vppo.models.qwen3_vl.rope import InterleavedMRoPE, get_rope_index


class DeepStackLayer(TransformerLayer):
    """A decoder layer that adds DeepStack tensor (its global index) from `context` [k, s, b, h]."""

    def forward(self, *args, **kwargs):
        hidden, context = super().forward(*args, **kwargs)
        g = self.layer_number - 1  # global, 0-based
        if context is not None and g < context.shape[0]:
            hidden = hidden + context[g].to(hidden.dtype)
        return hidden, context


class Qwen3VLModel(MegatronModule):
    """Qwen3-VL for one pipeline stage (or VPP chunk). See the module docstring."""

    def __init__(self, hf_config, model_cfg: ModelConfig | None = None, parallel: ParallelConfig | None = None, *,
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                 with_vision: bool = True, config=None, tp_group=None, init_weights: bool = True):
        self.hf_config = load_hf_config(hf_config)
        model_cfg = model_cfg or ModelConfig()
        config = config or lm_transformer_config(self.hf_config, model_cfg, parallel,
                                                 perform_initialization=init_weights)
        super().__init__(config=config)
        self.arch = a = text_arch(self.hf_config)
        self.vocab_size = a.vocab_size
        self.padded_vocab_size = padded_vocab_size(a.vocab_size, model_cfg.vocab_pad_multiple,
                                                   config.tensor_model_parallel_size)
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.share_embeddings_and_output_weights = a.tie_word_embeddings
        self.num_deepstack = a.num_deepstack if self.hf_config.get("vision_config") else 0
        # Every stage agrees: carry the DeepStack tensors between stages when there are stages.
        self.carry_deepstack = self.num_deepstack > 0 and config.pipeline_model_parallel_size > 1
        self._received_deepstack = None
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=lm_layer_spec(config, DeepStackLayer if self.num_deepstack else None),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=a.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=a.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=a.rope_theta,
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        self.language_model.rotary_pos_emb = InterleavedMRoPE(a.head_dim, a.rope_theta)
        self.model_type = self.language_model.model_type
        self.vision_model = None
        if pre_process and with_vision and self.hf_config.get("vision_config"):
            from megatron_vppo.models.qwen3_vl.vision import INHERITED_KEYS, Qwen3VisionModel

            base = {k: getattr(config, k) for k in INHERITED_KEYS if hasattr(config, k)}
            self.vision_model = Qwen3VisionModel(dict(self.hf_config["vision_config"]), base, tp_group=tp_group)

    # ---- what Megatron's schedules and train/passes.py call (models/spec.py `ModelChunk`) ----------
    def pipeline_seq_length(self, seq_length: int) -> int:
        return seq_length * (1 + self.num_deepstack) if self.carry_deepstack else seq_length

    def set_input_tensor(self, input_tensor) -> None:
        as_list = isinstance(input_tensor, (list, tuple))
        t = input_tensor[0] if as_list else input_tensor
        self._received_deepstack = None
        if t is not None and self.carry_deepstack:
            rows = t.shape[0] // (1 + self.num_deepstack)
            self._received_deepstack = t[rows:].reshape(self.num_deepstack, rows, *t.shape[1:])
            t = t[:rows]
        self.language_model.set_input_tensor([t] if as_list else t)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def position_ids(self, input_ids, image_grid_thw=None, attention_mask=None) -> torch.Tensor:
        return get_rope_index(self.arch, input_ids, image_grid_thw, attention_mask)[0]

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """First stage: ([s, b, h] embeddings with image features, [k, s, b, h] DeepStack or None)."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_pad = input_ids == self.arch.image_token_id
        n_pad = int(is_pad.sum())
        if pixel_values is None:
            if n_pad:
                raise ValueError(f"input_ids hold {n_pad} <|image_pad|> tokens but no pixel_values were given")
            return emb, None
        if self.vision_model is None:
            raise ValueError("pixel_values given but this model was built without a vision tower")
        if image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw ([num_images, 3] = t, h, w in patches)")
        feats, deepstack = self.vision_model(pixel_values, image_grid_thw)
        if feats.shape[0] != n_pad:
            raise ValueError(
                f"image token mismatch: input_ids hold {n_pad} <|image_pad|> tokens but image_grid_thw"
                f" {image_grid_thw.tolist()} gives {feats.shape[0]} image features; each image needs"
                f" t*h*w/{self.arch.spatial_merge_size ** 2} pad tokens in its prompt")
        mask = is_pad.unsqueeze(-1)
        emb = emb.transpose(0, 1).masked_scatter(mask, feats.to(emb.dtype)).transpose(0, 1).contiguous()
        zeros = emb.new_zeros(input_ids.shape[0], input_ids.shape[1], emb.shape[-1])
        ds = [zeros.masked_scatter(mask, f.to(emb.dtype)).transpose(0, 1) for f in deepstack]
        return emb, (torch.stack(ds) if ds else None)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """As `Qwen25VLModel.forward` (padded [b, s] with attention_mask, or packed thd [1, T] with
        per-segment position_ids); non-last stages return [hidden; DeepStack] when carrying."""
        tp = self.config.tensor_model_parallel_size
        sp = self.config.sequence_parallel
        if sp and input_ids.shape[1] % tp:
            raise ValueError(
                f"sequence parallel splits the sequence over tp={tp} ranks: sequence length {input_ids.shape[1]}"
                f" must be a multiple of {tp}; right-pad the batch (pad token, attention_mask 0) to a multiple of {tp}")
        if packed_seq_params is not None and (position_ids is None or attention_mask is not None
                                              or input_ids.shape[0] != 1):
            raise ValueError("packed (thd) input is one [1, T] row with per-segment position_ids [3, 1, T] and no"
                             " attention_mask; build it with train.rl_batch.collate_packed")
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
        mask = attention_mask_for(attention_mask)
        if mask is not None and self.config.transformer_impl == "transformer_engine":
            raise ValueError("left/middle padding needs an attention mask, which the Transformer Engine layers do"
                             " not take with causal masking; right-pad the batch or pass packed_seq_params (thd)")
        decoder_input, deepstack = None, self._received_deepstack
        if self.pre_process:
            decoder_input, deepstack = self.embed(input_ids, pixel_values, image_grid_thw)
            if sp:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
                if deepstack is not None:
                    deepstack = torch.stack([tensor_parallel.scatter_to_sequence_parallel_region(d)
                                             for d in deepstack])
        if deepstack is None and self.carry_deepstack:
            rows = input_ids.shape[1] // (tp if sp else 1)
            deepstack = torch.zeros(self.num_deepstack, rows, input_ids.shape[0], self.config.hidden_size,
                                    dtype=self.config.params_dtype, device=input_ids.device)
        out = self.language_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
            extra_block_kwargs={"context": deepstack} if deepstack is not None else None,
        )
        if not self.post_process and self.carry_deepstack:
            out = torch.cat([out, deepstack.reshape(-1, *deepstack.shape[2:])], dim=0)
        return out


def build_model_chunks(hf_config, model_cfg=None, parallel=None, *, dims=None, with_vision=True,
                       init_weights: bool = True) -> list:
    """This rank's model chunk(s) (one per virtual pipeline stage), after `init_distributed`;
    `init_weights=False` skips Megatron's random initialisation, as Qwen2.5-VL's `build_model_chunks`."""
    if dims is None:
        raise TypeError("build_model_chunks needs dims= (the ParallelDims init_distributed returned)")
    vpp = dims.vpp or 1
    chunks = [
        Qwen3VLModel(hf_config, model_cfg, parallel, pre_process=dims.first_stage and v == 0,
                     post_process=dims.last_stage and v == vpp - 1, vp_stage=v if vpp > 1 else None,
                     with_vision=with_vision, tp_group=dims.tp_group, init_weights=init_weights)
        for v in range(vpp)
    ]
    if not init_weights:  # Megatron records TP sharding inside the init it skipped
        mark_tensor_parallel_weights(chunks)
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks
