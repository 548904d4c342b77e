"""A tiny random Qwen2-VL (or Qwen2.5-VL) model folder with its processor, for tests of the vision-language data
side: the recipe of /work/shared/notes/vl-probe/build_model.py, on the embedded tiny model's tokenizer, built in
seconds. `tiny_vl_model` takes the embedded 'tiny-vl' when tgrpo.tiny offers it."""
import os

from PIL import Image

VISION_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' or 'video' in c %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # the processor's own: 4 to 16 image tokens an image


def tiny_vl_model(cache_dir: str, out: str, kind: str = "qwen2_vl") -> str:
    """The embedded 'tiny-vl' if tgrpo.tiny builds it, else a tiny random model of `kind` built into `out`."""
    from tgrpo import tiny

    if kind == "qwen2_vl" and "tiny-vl" in tiny.EMBEDDED:
        return tiny.ensure_model(cache_dir, "tiny-vl")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        build(tiny.ensure_tiny_model(cache_dir), out, kind)
    return out


def build(tokenizer_dir: str, out: str, kind: str = "qwen2_vl") -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = {"vocab_size": (len(tok) + 63) // 64 * 64, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]},
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>")}
    common = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "tie_word_embeddings": False}
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor
        vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor
        vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1]}
    model = Model(Config(text_config=text, vision_config=vision, **common)).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    shape = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2}
    Processor(image_processor=Qwen2VLImageProcessor(**shape), tokenizer=tok,
              video_processor=Qwen2VLVideoProcessor(**shape), chat_template=CHAT_TEMPLATE).save_pretrained(out)
    tok.save_pretrained(out)


def image(path: str, width: int, height: int, seed: int = 0, fmt: str | None = None) -> str:
    """A random-pixel RGB image of that size, written to `path`."""
    import random

    rng = random.Random(seed)
    Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3))).save(
        path, format=fmt)
    return path
