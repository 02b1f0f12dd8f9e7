"""Input images: check format, byte and pixel limits (decompression bombs included) and decode data URLs."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from core.settings import Settings

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageError(ValueError):
    """An input image the service refuses; `.code` is machine-readable (invalid_image, image_too_large)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def _looks_supported(data: bytes) -> bool:
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def inspect_image(data: bytes, settings: Settings) -> ImageInfo:
    """Check that `data` is a PNG, JPEG or WebP image within the byte and pixel limits.

    Header-only: the size comes from the header and `verify()` checks the file's structure (PNG chunk
    checksums) without decoding pixels, so a large inline image costs the API thread little. A file
    whose pixels are corrupt past a sound structure fails its job in the worker (`invalid_input`).
    """
    if len(data) > settings.max_upload_bytes:
        raise ImageError(
            "image_too_large", f"the image has {len(data)} bytes; at most {settings.max_upload_bytes}"
        )
    if not data:
        raise ImageError("invalid_image", "the image is empty")
    with warnings.catch_warnings():
        # PIL only warns below twice its own limit; a bomb is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            fmt = str(image.format)
            width, height = image.size
            if fmt not in IMAGE_FORMATS:
                raise ImageError(
                    "unsupported_image_format", f"{fmt} images are not accepted; use PNG, JPEG or WebP"
                )
            if width * height > settings.max_image_pixels:
                raise ImageError(
                    "image_too_large",
                    f"the image has {width}x{height} pixels; at most {settings.max_image_pixels}",
                )
            image.verify()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError("image_too_large", f"the image has too many pixels: {exc}") from exc
        except UnidentifiedImageError as exc:
            if _looks_supported(data):  # a PNG/JPEG/WebP signature, but broken beyond recognition
                raise ImageError("invalid_image", "the image is truncated or corrupt") from exc
            raise ImageError(
                "unsupported_image_format", "the data is not an image in a known format"
            ) from exc
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("invalid_image", f"the image cannot be decoded: {exc}") from exc
    return ImageInfo(content_type=IMAGE_FORMATS[fmt], width=width, height=height)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ImageError("invalid_image", "an inline image must be a data URL: data:image/png;base64,...")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError("image_too_large", f"the inline image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("invalid_image", f"the data URL is not valid base64: {exc}") from exc
