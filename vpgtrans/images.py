"""Images: BLIP-2's preprocessing and the rules that turn any readable image into 8-bit RGB.

``open_image`` checks the size from the header before decoding (decompression bombs); 16-bit
grayscale is scaled (not clipped), transparency is composited over white, CMYK / palette / grayscale
are converted by PIL (the table is in ``vpgtrans.data``'s docstring and docs/security.md).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_IMAGE_PIXELS = 8192 * 8192  # checked from the header, before decoding (decompression bombs)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def build_image_processor(image_size: int, mean=None, std=None):
    """BLIP-2's preprocessing: RGB, bicubic resize to a square, rescale, normalise (CLIP stats)."""
    try:  # the PIL backend, without torchvision (same preprocessing, no warning)
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": image_size, "width": image_size},
                              image_mean=list(mean or OPENAI_CLIP_MEAN), image_std=list(std or OPENAI_CLIP_STD),
                              do_convert_rgb=True)


class ImageTooLarge(ValueError):
    """An image whose header announces more than ``MAX_IMAGE_PIXELS`` pixels."""


def to_rgb(img):
    """Any PIL image -> 8-bit RGB: 16-bit grayscale scaled (not clipped) to 8 bits, transparency
    composited over white (as transformers' ``convert_to_rgb`` does for RGBA), CMYK / palette /
    grayscale / 1-bit converted by PIL."""
    import numpy as np
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)  # 0..65535 from a 16-bit file
        img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(image):
    """A row's image (a path, a PIL image, or a ``datasets`` ``{"bytes", "path"}`` dict) as 8-bit RGB.

    The size is checked from the header before anything is decoded; raises ``ImageTooLarge`` over
    ``MAX_IMAGE_PIXELS``, and whatever PIL raises for a file it cannot decode."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        return to_rgb(image)
    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    else:
        source = image
    if source is None:
        raise ValueError("no image data")
    if isinstance(source, (str, os.PathLike)):
        from vpgtrans.data import regular_file

        if not regular_file(source):  # a FIFO or a device would block or never end
            raise ValueError("not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from None
    with img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        img.load()
        return to_rgb(img)


def image_name(image) -> str:
    """A path, or for an image stored in the dataset a name from its content."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    if isinstance(image, dict) and isinstance(image.get("bytes"), bytes):
        return f"<embedded image sha1:{hashlib.sha1(image['bytes']).hexdigest()[:12]}>"
    return f"<embedded image {id(image):x}>"
