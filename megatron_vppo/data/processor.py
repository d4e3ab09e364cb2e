"""Image-only Qwen2.5-VL processor: prompt text (spec §7), image patches, image-pad expansion.

Why our own: the stock `Qwen2_5_VLProcessor` builds a video processor that needs torchvision (not
usable beside the CPU torch), and `AutoProcessor` silently returns only the tokenizer for a
directory without one. This class holds the tokenizer and the image processor of the model's MODELS spec
(`Qwen2VLImageProcessorPil` for Qwen2.5-VL) directly.

Prompt rule (spec §7): chat template with system "You are a helpful assistant."; the user turn is
`problem + INSTRUCTION`, where each "<image>" placeholder in `problem` becomes
`<|vision_start|><|image_pad|><|vision_end|>` and the images fill the placeholders in order.
A problem with images but no placeholder gets all its images prepended to the user turn (the
Qwen-VL convention of image-then-text). Any other mismatch between placeholders and images is an
error. The text is kept verbatim (no trimming).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_vppo.data.dataset import IMAGE_PLACEHOLDER
SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "\n\nYou first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = (
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
)


def to_pil(image: Any):
    """PIL image, path, raw bytes, or a `datasets` Image dict ({"bytes"| "path"}) -> RGB PIL."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, Path)):
        img = Image.open(image)
    elif isinstance(image, (bytes, bytearray)):
        img = Image.open(io.BytesIO(image))
    elif isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        img = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, a path or bytes")
    return img.convert("RGB") if img.mode != "RGB" else img


class VLProcessor:
    """Tokenizer + Qwen2-VL image processor for image-only Qwen2.5-VL prompts."""

    def __init__(self, tokenizer, image_processor, instruction: str = INSTRUCTION, system_prompt: str = SYSTEM_PROMPT,
                 spec=None):
        from megatron_vppo.config import ModelConfig
        from megatron_vppo.models import MODELS

        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec or MODELS[ModelConfig().arch]  # the model's MODELS entry (its resize rule)
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.merge_size = int(image_processor.merge_size)
        ids = tokenizer.convert_tokens_to_ids([VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("tokenizer lacks Qwen-VL vision tokens (<|vision_start|>, <|image_pad|>, ...)")
        self.vision_start_id, self.image_token_id, self.vision_end_id, self.video_token_id = ids

    @classmethod
    def from_pretrained(
        cls, path, min_pixels: int | None = None, max_pixels: int | None = None, *, arch: str | None = None,
        **kwargs
    ) -> "VLProcessor":
        """Load from an HF model directory; `min_pixels`/`max_pixels` override its preprocessor
        (e.g. spec §7's 200704 / 1003520 for the 7B recipe). The image processor is the class of the
        model's MODELS spec: `arch` names it, else the directory's config.json `model_type` does (a
        tokenizer/processor-only directory: the default `model.arch`)."""
        from transformers import AutoTokenizer

        from megatron_vppo.config import ModelConfig
        from megatron_vppo.models import MODELS, spec_for_hf_config

        if arch is None and not (Path(path) / "config.json").is_file():
            arch = ModelConfig().arch
        spec = MODELS[arch] if arch is not None else spec_for_hf_config(path)
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} > max_pixels {max_pixels}; swap them")
        tok = AutoTokenizer.from_pretrained(str(path))
        ip_kwargs = {}
        if min_pixels is not None:
            ip_kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            ip_kwargs["max_pixels"] = int(max_pixels)
        ip = spec.image_processor_class().from_pretrained(str(path), **ip_kwargs)
        return cls(tok, ip, spec=spec, **kwargs)

    @property
    def geometry(self):
        """The `models.ImageGeometry` (patch, merge, temporal patch) this processor applies."""
        from megatron_vppo.models import ImageGeometry

        return ImageGeometry.of_image_processor(self.image_processor)

    # ---- ids the trainer and the rollout need -------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def multimodal_token_ids(self) -> tuple[int, ...]:
        """Tokens only the processor may place: a sampled one would claim an image that is not there,
        so rollouts ban them (SamplingParams.banned_token_ids)."""
        ids = (self.image_token_id, self.video_token_id, self.vision_start_id, self.vision_end_id)
        return tuple(int(i) for i in ids if i is not None and i >= 0)

    # ---- prompt text ---------------------------------------------------------------------------
    def user_content(self, problem: str, num_images: int | None = None) -> list[dict]:
        """The user turn as chat-template content parts (images in placeholder order)."""
        if not isinstance(problem, str):
            raise TypeError(f"problem must be a str, got {type(problem).__name__}")
        n_placeholders = problem.count(IMAGE_PLACEHOLDER)
        if num_images is None:
            num_images = n_placeholders
        if n_placeholders == 0 and num_images > 0:
            return [{"type": "image"}] * num_images + [{"type": "text", "text": problem + self.instruction}]
        if n_placeholders != num_images:
            raise ValueError(
                f"problem has {n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} image(s) "
                f"were given; give one image per placeholder (or none in the text to prepend them all)"
            )
        parts: list[dict] = []
        pieces = (problem + self.instruction).split(IMAGE_PLACEHOLDER)
        for i, text in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        return parts

    def build_prompt(self, problem: str, num_images: int | None = None) -> str:
        """Spec §7 prompt text, ending with the assistant header (generation prompt).
        `num_images` defaults to the number of placeholders in `problem`."""
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_content(problem, num_images)},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ---- tensors -------------------------------------------------------------------------------
    def process_images(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixel_values [N, C*temporal_patch*patch*patch] float32 (merge-window order), image_grid_thw [n, 3]."""
        out = self.image_processor(images=[to_pil(im) for im in images], return_tensors="pt")
        return out["pixel_values"].to(torch.float32), out["image_grid_thw"].to(torch.long)

    def image_grids(self, images: Sequence[Any]) -> torch.Tensor:
        """image_grid_thw [n, 3] from the images' sizes alone (the image processor's own `smart_resize`
        geometry), without resizing or normalising a pixel: what token expansion and M-RoPE need, so
        ranks that never embed an image need not process it."""
        ip = self.image_processor
        rows = []
        for im in images:
            w, h = to_pil(im).size
            rh, rw = self.spec.resized_size(h, w, ip)
            rows.append([1, rh // ip.patch_size, rw // ip.patch_size])
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    def encode(self, problem: str, images: Sequence[Any] | None = None, response=None, *,
               pixels: bool = True) -> dict:
        """One sample -> dict(input_ids LongTensor[seq], pixel_values [N,1176] | None,
        image_grid_thw [n,3] | None, mm_token_type_ids IntTensor[seq] (1 on image tokens),
        response_start int = prompt length). Each image's single <|image_pad|> is expanded to
        t*h*w/merge^2 tokens. `response` (str or token ids) is appended verbatim after the prompt.
        `pixels=False` leaves pixel_values None and takes the grids from `image_grids` (the caller
        processes the images later, once, where they are embedded)."""
        images = list(images or [])
        prompt = self.build_prompt(problem, len(images))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        pixel_values = image_grid_thw = None
        if images:
            if pixels:
                pixel_values, image_grid_thw = self.process_images(images)
            else:
                image_grid_thw = self.image_grids(images)
            counts = (image_grid_thw.prod(-1) // self.merge_size**2).tolist()
            pad_at = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if len(pad_at) != len(counts):  # a literal <|image_pad|> typed into the problem text
                raise ValueError(
                    f"prompt has {len(pad_at)} {IMAGE_PAD} tokens for {len(counts)} images; the problem text "
                    f"must not contain Qwen vision tokens itself, use '{IMAGE_PLACEHOLDER}'"
                )
            expanded: list[int] = []
            prev = 0
            for pos, n in zip(pad_at, counts):
                expanded += ids[prev:pos] + [self.image_token_id] * n
                prev = pos + 1
            ids = expanded + ids[prev:]
        elif self.image_token_id in ids:
            raise ValueError(f"problem text contains {IMAGE_PAD} but no images were given")

        response_start = len(ids)
        if response is not None:
            if isinstance(response, str):
                resp = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            else:
                resp = torch.as_tensor(response, dtype=torch.long).reshape(-1).tolist()
            if self.image_token_id in resp or self.video_token_id in resp:
                raise ValueError("response contains image/video pad tokens; they may only come from images")
            ids = ids + resp

        input_ids = torch.tensor(ids, dtype=torch.long)
        return dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            response_start=response_start,
        )


def collate(samples: Sequence[dict], pad_token_id: int) -> dict:
    """Right-pad a list of `VLProcessor.encode` outputs into a batch.

    -> input_ids [B,S], attention_mask [B,S] (1 = real token), mm_token_type_ids [B,S],
    pixel_values [sum N,1176] | None and image_grid_thw [sum n,3] | None (samples' images
    concatenated in batch order, as HF Qwen2.5-VL expects), response_start LongTensor[B].
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    seq = max(s["input_ids"].numel() for s in samples)
    b = len(samples)
    input_ids = torch.full((b, seq), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, seq), dtype=torch.long)
    mm = torch.zeros((b, seq), dtype=torch.int32)
    for i, s in enumerate(samples):
        n = s["input_ids"].numel()
        input_ids[i, :n] = s["input_ids"]
        attention_mask[i, :n] = 1
        mm[i, :n] = s["mm_token_type_ids"]
    pv = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    thw = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm,
        pixel_values=torch.cat(pv) if pv else None,
        image_grid_thw=torch.cat(thw) if thw else None,
        response_start=torch.tensor([s["response_start"] for s in samples], dtype=torch.long),
    )
