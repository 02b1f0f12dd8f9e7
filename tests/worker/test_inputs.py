"""Input images as the model gets them: EXIF orientation applied, sides bounded, the original kept."""

from __future__ import annotations

import io
import time
from pathlib import Path

from PIL import Image

from core.images import inspect_image
from core.params import SIDE
from core.settings import Settings
from model import EditRequest, NexusGen, UnderstandRequest
from worker.execute import decode_input


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, width // 4, height))  # a blue band on the left edge
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    # Orientation 6: the camera was turned; viewers rotate 90 degrees clockwise.
    upright = decode_input(_jpeg(640, 320, orientation=6), "upl_x")
    assert upright.size == (320, 640)
    top = upright.getpixel((160, 10))  # the left band ends up on top
    assert isinstance(top, tuple) and top[2] > 150 and top[0] < 100
    plain = decode_input(_jpeg(640, 320), "upl_y")
    assert plain.size == (640, 320)


def test_a_large_photo_is_bounded_early_and_fast() -> None:
    data = _jpeg(8000, 5000)  # 40 MP
    started = time.process_time()
    image = decode_input(data, "upl_z")
    cpu_s = time.process_time() - started
    assert max(image.size) <= SIDE.high and image.mode == "RGB"
    assert abs(image.width / image.height - 8000 / 5000) < 0.01
    assert cpu_s < 1.5, f"decoding a 40 MP JPEG took {cpu_s:.2f} s of CPU"


def test_inputs_at_the_aspect_ratio_bound_run_through_the_model(tiny_checkpoint: Path) -> None:
    """What the API takes (longer side MAX_ASPECT_RATIO times the shorter), shrunk as the worker shrinks
    it, is edited and understood by the tiny model without an error."""
    model = NexusGen.from_pretrained(str(tiny_checkpoint), device="cpu", prefix_mode="forced")
    images = []
    for size in ((40000, 200), (200, 39400)):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
        inspect_image(buf.getvalue(), Settings())
        images.append(decode_input(buf.getvalue(), "upl_bound"))
    fast = {"steps": 1, "width": 256, "height": 256}
    edits = model.edit([EditRequest("make it blue", image, seed=0, **fast) for image in images])
    assert [r.error for r in edits] == [None, None] and all(r.image.size == (256, 256) for r in edits)
    answers = model.understand(
        [UnderstandRequest("what is it?", image, max_new_tokens=2) for image in images]
    )
    assert [r.error for r in answers] == [None, None]
