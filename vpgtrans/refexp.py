"""RefCOCO-style referring-expression rows, as users have them from the annotation files:

    {"image": "relative/path.jpg", "expression": "the man on the left", "bbox": [x1, y1, x2, y2]}

with the box in **pixels** of the image: ``xyxy`` (corners, the default) or ``xywh`` (RefCOCO's own
``[x, y, width, height]``, ``--bbox-format xywh``). An optional ``"objects"`` holds the boxes of the
other objects in the image, in the same format (the largest-object baseline reads them).

``from_refexp`` turns such a row into the loader's grounding row ``{"image", "question", "box"}`` with the
box normalised to [0, 1] by the image's width and height (read from the file header; nothing is
decoded). A box that overhangs the image by rounding is clamped to it; a box with no area inside the
image, negative sizes or non-numbers is a bad row.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

BBOX_FORMATS = ("xyxy", "xywh")


class RowProblem(Exception):
    """A row to skip: ``kind`` is the loader's counter (``bad_row``, ``missing_image``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def is_refexp(row: dict) -> bool:
    """A RefCOCO-style row (``expression`` + ``bbox``) not already in the normalised form."""
    return row.get("expression") is not None and row.get("bbox") is not None and row.get("box") is None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def pixel_box(value, bbox_format: str, width: int, height: int, key: str = "bbox") -> list[float]:
    """A pixel box in ``bbox_format`` -> normalised ``[x1, y1, x2, y2]``, clamped to the image."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or \
            not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise RowProblem("bad_row", f"'{key}' must be four finite numbers in pixels ({bbox_format})")
    x1, y1, a, b = (float(v) for v in value)
    if bbox_format == "xywh":
        if a <= 0 or b <= 0:
            raise RowProblem("bad_row", f"'{key}' [x, y, w, h] needs w > 0 and h > 0 (got {a:g}, {b:g})")
        x2, y2 = x1 + a, y1 + b
    else:
        x2, y2 = a, b
    if not (x1 < x2 and y1 < y2):
        raise RowProblem("bad_row", f"'{key}' [x1, y1, x2, y2] needs x1 < x2 and y1 < y2"
                                    + (" (is it [x, y, w, h]? pass --bbox-format xywh)" if a > 0 and b > 0 else ""))
    box = [min(max(x1, 0.0), width) / width, min(max(y1, 0.0), height) / height,
           min(max(x2, 0.0), width) / width, min(max(y2, 0.0), height) / height]
    if not (box[0] < box[2] and box[1] < box[3]):
        raise RowProblem("bad_row", f"'{key}' lies outside the {width}x{height} image")
    return box


def from_refexp(row: dict, data_dir: Path, bbox_format: str = "xyxy") -> dict:
    """The loader's grounding row of a RefCOCO-style row (see the module docstring)."""
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {', '.join(BBOX_FORMATS)} (got {bbox_format!r})")
    image, expression = row.get("image"), row["expression"]
    if not isinstance(image, str) or not image:
        raise RowProblem("bad_row", "'image' must be a non-empty path string")
    if not isinstance(expression, str):
        raise RowProblem("bad_row", f"'expression' must be a string (got {type(expression).__name__}); one "
                                    "expression per row")
    path = Path(data_dir) / image
    if not path.is_file():
        raise RowProblem("missing_image", f"image {image!r} not found")
    try:
        width, height = image_size(path)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises for a file it cannot read
        raise RowProblem("bad_row", f"cannot read the size of {image!r} to normalise 'bbox' "
                                    f"({type(exc).__name__})") from None
    clean = {"image": image, "question": expression, "box": pixel_box(row["bbox"], bbox_format, width, height)}
    objects = row.get("objects")
    if objects is not None:
        if not isinstance(objects, list):
            raise RowProblem("bad_row", "'objects' must be a list of boxes")
        clean["objects"] = [pixel_box(box, bbox_format, width, height, "objects") for box in objects]
    return clean
