"""Image checks shared by ingestion and training: confined paths, safe decoding."""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from muco_flow.modeling.image_sizing import TINY_IMAGE_SIZE, tiny_image_size, upscale_tiny_image

# Qwen2-VL's image processor refuses a long side more than 200 times the short one.
MAX_ASPECT_RATIO = 200.0


class UnsafePathError(ValueError):
    """An image path from the data would leave the snapshot root."""


class ImageDecodeError(ValueError):
    """Bytes that are not a complete, decodable image of acceptable size."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def confined_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and symlinks out of ``root``."""
    if not relative or not relative.strip():
        raise UnsafePathError("image path is empty")
    if "\x00" in relative:
        # the OS would cut the name at the NUL, or refuse it: either way not the file named
        raise UnsafePathError(f"image path {relative!r} contains a NUL byte")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or relative.startswith("~") or (len(relative) > 1 and relative[1] == ":"):
        raise UnsafePathError(f"image path '{relative}' is absolute")
    if ".." in pure.parts:
        raise UnsafePathError(f"image path '{relative}' contains '..'")
    candidate = root / Path(*pure.parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(candidate), real_root]) != real_root:
        raise UnsafePathError(f"image path '{relative}' resolves outside the snapshot root (symlink)")
    return candidate


def confined_key(relative: str) -> str:
    """The same rules for an object-store key below a prefix (no symlinks there)."""
    confined_path(Path("/__root__"), relative)
    return str(PurePosixPath(relative.replace("\\", "/")))


_OBJECT_ADDRESS = re.compile(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # the bytes to store: the original, or a PNG if upscaled
    width: int
    height: int
    upscaled: bool


def _check_aspect_ratio(width: int, height: int, limit: float) -> None:
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > limit:
        raise ImageDecodeError(
            "IMAGE_ASPECT_RATIO",
            f"image is {width}x{height} pixels: its long side is {ratio:.0f} times its short side, "
            f"the limit is {limit:g}",
        )


def check_image(data: bytes, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> CheckedImage:
    """Decodes ``data`` fully, guards against decompression bombs, upscales tiny images.

    Raises ImageDecodeError with a reason code: EMPTY_IMAGE, IMAGE_TOO_LARGE,
    IMAGE_ASPECT_RATIO or IMAGE_UNDECODABLE.
    """
    if not data:
        raise ImageDecodeError("EMPTY_IMAGE", "image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that; make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header, before any pixel is decoded
                if width * height > max_pixels:
                    raise Image.DecompressionBombError(f"{width}x{height} pixels")
                # Checked on the image as sent, tiny ones too: MuCo would stretch a 3 x 900 image
                # to 56 x 56, but its content is no use squeezed 300 times.
                _check_aspect_ratio(width, height, max_aspect_ratio)
                image.load()  # decodes every byte: truncated files fail here
                small = tiny_image_size(width, height) != (width, height)
                if small:
                    out = io.BytesIO()
                    upscale_tiny_image(image).save(out, "PNG")
                    data = out.getvalue()
                    width, height = TINY_IMAGE_SIZE
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(
            "IMAGE_TOO_LARGE", f"image exceeds the decompression-bomb limit of {max_pixels} pixels ({err})"
        ) from None
    except Exception as err:
        # Pillow parses hostile bytes with many decoders, and they fail in many ways: OSError,
        # SyntaxError, ValueError, but also RuntimeError (AVIF), NotImplementedError (DDS),
        # struct.error, IndexError, MemoryError... Whatever it is, these bytes are not an image we can use.
        # without object addresses (Pillow names its "<_io.BytesIO object at 0x...>"), so that a
        # re-run writes the same rejects file
        described = _OBJECT_ADDRESS.sub("", str(err))
        raise ImageDecodeError(
            "IMAGE_UNDECODABLE", f"image cannot be decoded: {type(err).__name__}: {described}"
        ) from None
    return CheckedImage(data=data, width=width, height=height, upscaled=small)
