"""Images of vision-language prompts, and the model's processor that turns them into tokens and pixels.

`ImageRef` is one image of a prompt, checked when the data is read (its header: that it is an image, and its
size) and decoded only when a rollout or a policy rank needs its pixels. `image_ref` turns the image values users
bring (paths, file:// and data: URIs, bytes, datasets.Image's {bytes, path}, PIL images) into one, or a ConfigError
line naming it. `VisionProcessor` wraps the model folder's own processor (Qwen2-VL and Qwen2.5-VL's), with
min_pixels/max_pixels applied, so that the trainer, the data's token counts and vLLM resize every image alike.

A shared leaf: imports tgrpo.errors and third-party libraries only.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field

from PIL import Image

from tgrpo.errors import ConfigError

_ORIENTATION = 0x0112  # the EXIF tag
_SWAPPED = (5, 6, 7, 8)  # orientations that turn the image a quarter: its width and height swap
# orientation -> how to turn the pixels upright, as ImageOps.exif_transpose does
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class ImageRef:
    """One image of a prompt: `source` is an absolute path or the encoded image's bytes; `label` names it in error
    lines (the path as the data wrote it, or 'train_data row 12 image 2 of 3'); `size` is (width, height) as `open`
    gives it (EXIF orientation applied), read from the header when the data was loaded."""
    source: str | bytes = field(repr=False)
    label: str
    size: tuple[int, int] = (0, 0)

    def open(self):
        """The image in RGB, as the processor and vLLM would see it: EXIF orientation applied (as datasets and
        vLLM do) and transparency laid on white (as transformers' convert_to_rgb does)."""
        with Image.open(self.source if isinstance(self.source, str) else io.BytesIO(self.source)) as image:
            turn = _TURNS.get(_orientation(image))  # read before the pixels, as the header size was
            if image.mode != "RGB":
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba)
            image = image.convert("RGB")
            return image.transpose(turn) if turn is not None else image

    def ref(self) -> str:
        """What a remote reward service is told of the image: its path, or the sha1 of its bytes."""
        if isinstance(self.source, str):
            return self.source
        return "sha1:" + hashlib.sha1(self.source).hexdigest()


def image_ref(value, where: str, base_dir: str) -> ImageRef:
    """The ImageRef of one image value of the data, its header read; `where` names it in the ConfigError line
    ('train_data row 3 image 1'). Relative paths are read from `base_dir` (the data file's folder), else from the
    working directory (where verl and TRL scripts read them); URLs are refused (training nodes often have no
    network)."""
    if isinstance(value, dict):  # datasets.Image's storage: {"bytes": ..., "path": ...}, either may be None
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise ConfigError(f"{where} is a dict with keys {sorted(value)} and no image: give a path, the image's "
                              "bytes, or {\"bytes\": ..., \"path\": ...} as datasets.Image stores them")
    label = shown = where
    if isinstance(value, str):
        label = where if value[:5].lower() == "data:" else value
        shown = f"{where} '{value[:60]}{'...' * (len(value) > 60)}'"
        value = _from_string(value, shown, base_dir)
    elif isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    elif isinstance(value, Image.Image):  # a datasets.Image that was decoded: kept lossless, as bytes
        buffer = io.BytesIO()
        value.save(buffer, format="PNG" if value.mode in ("1", "L", "LA", "RGB", "RGBA", "P") else "TIFF")
        value = buffer.getvalue()
    elif not isinstance(value, bytes):
        kind = "null" if value is None else type(value).__name__
        raise ConfigError(f"{where} is {kind}, not an image: give a path (relative to the data file's folder, or "
                          "absolute), the image's bytes, or a data: URI")
    return ImageRef(value, label, _header_size(value, shown))


def _from_string(value: str, shown: str, base_dir: str) -> str | bytes:
    """A path (plain or file://) as an absolute path, or a data: URI's bytes."""
    lower = value[:8].lower()
    if lower.startswith(("http://", "https://")):
        raise ConfigError(f"{shown} is a URL: download the images first and give their paths (training nodes "
                          "often have no network)")
    if lower.startswith("data:"):
        head, _, payload = value.partition(",")
        if not head.lower().endswith(";base64") or not payload:
            raise ConfigError(f"{shown} is a data: URI that is not base64 ('data:image/png;base64,...'): encode the "
                              "image in base64, or give its path")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{shown} is a data: URI whose base64 does not decode: encode the image again, or "
                              "give its path") from None
    path = value[len("file://"):] if lower.startswith("file://") else value
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        if os.path.isfile(path):
            return path
        raise ConfigError(f"{shown} does not exist: fix the path")
    beside = os.path.join(base_dir, path)
    for candidate in (beside, os.path.abspath(path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"{shown} does not exist (not as {beside}, nor in the working directory {os.getcwd()}): "
                      "relative paths are read from the data file's folder; fix the path")


def _header_size(source: str | bytes, shown: str) -> tuple[int, int]:
    """(width, height) from the image's header alone (no pixels decoded), EXIF orientation applied."""
    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
            width, height = image.size
            orientation = _orientation(image)
    except Exception as e:  # noqa: BLE001 - PIL's many kinds: unidentified, truncated, decompression bomb, OSError
        lines = str(e).strip().splitlines()
        raise ConfigError(f"{shown} cannot be read as an image ({type(e).__name__}: "
                          f"{lines[0] if lines else 'no detail'}): fix or replace it") from None
    return (height, width) if orientation in _SWAPPED else (width, height)


def _orientation(image) -> int:
    """The EXIF orientation of an opened image, from what its header holds: PIL's getexif() decodes a whole PNG
    to look for EXIF after the pixels."""
    if image.format == "TIFF":  # its EXIF tags are the header's own
        return image.getexif().get(_ORIENTATION, 1)
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(_ORIENTATION, 1)


def has_vision(model_dir: str) -> bool:
    """Whether the model's config has a vision tower (a vision_config)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is not None


class VisionProcessor:
    """The model folder's processor with min_pixels/max_pixels applied: image token counts, pixels, and the
    settings vLLM needs to resize alike."""

    def __init__(self, processor, overridden: bool = False):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.image_token_id: int = int(processor.image_token_id)
        self.chat_template: str | None = processor.chat_template or getattr(processor.tokenizer, "chat_template",
                                                                             None)
        size = self.image_processor.size
        self.min_pixels: int = int(size["shortest_edge"])
        self.max_pixels: int = int(size["longest_edge"])
        # an image token stands for a merge_size^2 block of patches: (patch_size * merge_size)^2 pixels
        self.pixels_per_token: int = (self.image_processor.patch_size * self.image_processor.merge_size) ** 2
        self._overridden = overridden

    @classmethod
    def load(cls, model_dir: str, min_pixels: int = 0, max_pixels: int = 0) -> VisionProcessor | None:
        """The processor of `model_dir`, or None for a text-only model (no vision_config). min_pixels and
        max_pixels, where > 0, replace the processor's own (its size's shortest_edge and longest_edge)."""
        if not has_vision(model_dir):
            return None
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001 - a missing or corrupt processor file, of many kinds
            lines = str(e).strip().splitlines()
            raise ConfigError(f"model '{model_dir}' has a vision tower but its processor cannot be loaded "
                              f"({type(e).__name__}: {lines[0] if lines else 'no detail'}): copy the model's "
                              "processor files (processor_config.json or preprocessor_config.json) into the folder, "
                              "or download it again") from None
        image_processor = getattr(processor, "image_processor", None)
        if (image_processor is None or getattr(processor, "image_token_id", None) is None
                or not hasattr(image_processor, "get_number_of_image_patches")):
            raise ConfigError(f"model '{model_dir}' has a vision tower but no image processor of Qwen2-VL's kind "
                              f"(it loads as {type(processor).__name__}): copy the model's processor files "
                              "(processor_config.json or preprocessor_config.json) into the folder")
        if min_pixels or max_pixels:
            size = image_processor.size
            low, high = min_pixels or int(size["shortest_edge"]), max_pixels or int(size["longest_edge"])
            if low > high:
                raise ConfigError(f"min_pixels {low} is above max_pixels {high} (the {'min' if max_pixels else 'max'}"
                                  f"_pixels of model '{model_dir}''s processor): set both")
            image_processor.size = (dataclasses.replace(size, shortest_edge=low, longest_edge=high)
                                    if dataclasses.is_dataclass(size) else
                                    {**size, "shortest_edge": low, "longest_edge": high})
        return cls(processor, overridden=bool(min_pixels or max_pixels))

    def tokens_for(self, width: int, height: int) -> int:
        """Image tokens for an image of this size: the processor's own resize rule (smart_resize), no pixels
        decoded. ValueError for a shape the processor refuses (an aspect ratio above 200)."""
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return patches // self.image_processor.merge_size ** 2

    def pixels(self, images: list) -> tuple:
        """pixel_values [patches, dim] and image_grid_thw [n, 3] of these PIL images, as processor(images=...)
        gives them."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def expand(self, ids: list[int], tokens: list[int]) -> list[int]:
        """`ids` with the i-th image token repeated tokens[i] times (the processor's expansion)."""
        out, images = [], iter(tokens)
        for token in ids:
            if token == self.image_token_id:
                out.extend([token] * next(images))
            else:
                out.append(token)
        return out

    def collapse(self, ids: list[int]) -> list[int]:
        """Each run of image tokens as one: what vLLM takes beside multi_modal_data (it expands them itself)."""
        return [t for i, t in enumerate(ids) if t != self.image_token_id or i == 0 or ids[i - 1] != t]

    def engine_kwargs(self) -> dict:
        """vLLM's mm_processor_kwargs, so that it resizes images as this processor does: the pixel bounds where
        min_pixels or max_pixels replaced the folder's own (else vLLM reads the same folder's)."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels} if self._overridden else {}

    def save(self, dest: str) -> None:
        """The processor (with its pixel bounds) into a checkpoint folder."""
        self.processor.save_pretrained(dest)
