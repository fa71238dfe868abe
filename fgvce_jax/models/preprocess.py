"""torchvision's eval transform, ``Resize(size) + CenterCrop(crop) + ToTensor + Normalize``, in numpy/PIL.

The resize is done with PIL exactly as torchvision does for PIL inputs
(``Image.resize`` with BILINEAR, which is antialiased), so the output matches
torchvision's to within float rounding. Output is NHWC float32.

Example::

    x = eval_transform([Image.open(p) for p in paths], size=256, crop=224)   # (N, 224, 224, 3)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from fgvce_jax.errors import FgvceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise FgvceError(f"expected a PIL image or a uint8 (h, w[, 1|3|4]) array, got {a.dtype} {a.shape}")
    return Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a).convert("RGB")


def resize_crop_layout(height: int, width: int, size: int, crop: int) -> tuple[int, int, int, int]:
    """torchvision ``Resize(size)`` + ``CenterCrop(crop)`` geometry: (new_h, new_w, top, left).

    The shorter side becomes ``size``, the longer ``int(size * long / short)``;
    the crop starts at ``round((new - crop) / 2)`` on each axis.
    """
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    return new_h, new_w, int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))


def resize_center_crop(image, size: int, crop: int) -> np.ndarray:
    """One image (PIL or uint8 (h, w[, c])) -> uint8 (crop, crop, 3), as shown to a person (see ``resize_crop_layout``)."""
    if crop > size:
        raise FgvceError(f"crop {crop} is larger than the resize size {size}")
    img = _to_pil(image)
    w, h = img.size
    new_h, new_w, top, left = resize_crop_layout(h, w, size, crop)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def normalize(images_uint8: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
    x = np.asarray(images_uint8, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_transform(images, size: int = 256, crop: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """PIL image(s) or uint8 array(s) -> float32 (N, crop, crop, 3), torchvision's eval transform.

    ``images`` is one PIL image, one uint8 (h, w, 3) array, a uint8 (N, h, w, 3)
    batch, or a list of any of these single images.
    """
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    batch = [resize_center_crop(im, size, crop) for im in images]
    if not batch:
        raise FgvceError("no images given")
    return normalize(np.stack(batch), mean, std)
