"""Input images: check format, byte and pixel limits (decompression bombs included), the aspect ratio and
decode data URLs; the size the worker shrinks an input to."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError

from core.params import MAX_ASPECT_RATIO
from core.settings import Settings

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageError(ValueError):
    """An input image the service refuses; `.code` is machine-readable (invalid_image, image_too_large,
    unsupported_image_format, image_aspect_ratio_too_large)."""

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


# EXIF orientations that turn the image a quarter: viewers, and the worker (ImageOps.exif_transpose), show
# it with width and height swapped.
_QUARTER_TURNS = (5, 6, 7, 8)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown, its EXIF orientation applied. Only the EXIF block read with
    the header is used (`getexif()` would decode a whole PNG to look for a late one)."""
    width, height = image.size
    raw = image.info.get("exif")
    if not raw:
        return width, height
    exif = Image.Exif()
    try:
        exif.load(raw)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):  # an EXIF block PIL cannot parse
        return width, height
    turned = exif.get(ExifTags.Base.Orientation) in _QUARTER_TURNS
    return (height, width) if turned else (width, height)


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
            width, height = upright_size(image)
            if fmt not in IMAGE_FORMATS:
                raise ImageError(
                    "unsupported_image_format", f"{fmt} images are not accepted; use PNG, JPEG or WebP"
                )
            if width * height > settings.max_image_pixels:
                raise ImageError(
                    "image_too_large",
                    f"the image has {width}x{height} pixels; at most {settings.max_image_pixels}",
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageError(
                    "image_aspect_ratio_too_large",
                    f"the image is {width}x{height} pixels; its longer side may be at most "
                    f"{MAX_ASPECT_RATIO} times its shorter side",
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


def shrunk_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """The size of a `width` x `height` image scaled down to at most `longest` pixels a side (unchanged if
    it fits). The shorter side rounds up, so the aspect ratio never grows: 40000x200 becomes 2048x11
    (186:1), where PIL's `thumbnail` would give 2048x10 (204.8:1, past MAX_ASPECT_RATIO)."""
    if max(width, height) <= longest:
        return width, height
    if width >= height:
        return longest, -(-height * longest // width)  # integer ceil: no float error at exact ratios
    return -(-width * longest // height), longest


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
