"""Per-task loading: a worker holds only what its tasks need and answers other jobs with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.pipeline import NexusGen
from model.requests import EditRequest, GenerateRequest, UnderstandRequest

PICTURE = Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3))
SMALL = dict(width=256, height=256, steps=1, seed=3)


def module_types(pipe: NexusGen) -> set[str]:
    """Class names of every module the loaded stack holds (not what the settings say)."""
    found: set[str] = set()
    for value in vars(pipe.components).values():
        if hasattr(value, "modules"):
            found |= {type(m).__name__ for m in value.modules()}
    return found


def test_generate_only_worker_holds_no_editing_dit_or_merger(tiny_dir: Path) -> None:
    pipe = NexusGen.from_pretrained(str(tiny_dir), tasks=["generate"], prefix_mode="forced")
    types = module_types(pipe)
    assert "ImageEmbeddingMerger" not in types
    assert pipe.components.edit_dit is None and pipe.components.gen_dit is not None
    dits = [v for v in vars(pipe.components).values() if type(v).__name__ == "FluxTransformer2DModel"]
    assert len(dits) == 1
    assert pipe.generate([GenerateRequest(prompt="a red cube", **SMALL)])[0].image is not None
    (edit,) = pipe.edit([EditRequest(instruction="make it blue", image=PICTURE, **SMALL)])
    assert edit.image is None and edit.error is not None and edit.error.code == "task_not_loaded"
    assert "edit decoder" in edit.error.message
    # edits that ask for the generation decoder are served by the generation DiT this worker has
    (via_gen,) = pipe.edit([EditRequest(instruction="x", image=PICTURE, decoder="generation", **SMALL)])
    assert via_gen.error is None and via_gen.image is not None


def test_understand_only_worker_holds_no_dit(tiny_dir: Path) -> None:
    pipe = NexusGen.from_pretrained(str(tiny_dir), tasks=["understand"])
    types = module_types(pipe)
    assert not types & {"FluxTransformer2DModel", "T5EncoderModel", "CLIPTextModel", "AutoencoderKL"}
    assert pipe.components.vision_head is None and pipe.loaded == {"ar", "vit"}
    (answer,) = pipe.understand([UnderstandRequest(instruction="what?", image=PICTURE, max_new_tokens=3)])
    assert answer.error is None and isinstance(answer.text, str)
    (gen,) = pipe.generate([GenerateRequest(prompt="a red cube", **SMALL)])
    assert gen.error is not None and gen.error.code == "task_not_loaded"


def test_edit_worker_loads_the_generation_dit_only_when_edits_may_ask_for_it(tiny_dir: Path) -> None:
    pipe = NexusGen.from_pretrained(
        str(tiny_dir), tasks=["edit"], edit_decoders=["edit"], prefix_mode="forced"
    )
    assert pipe.components.gen_dit is None and pipe.components.adapter is None
    assert pipe.components.edit_dit is not None and pipe.components.merger is not None
    (ok,) = pipe.edit([EditRequest(instruction="make it blue", image=PICTURE, **SMALL)])
    assert ok.image is not None
    (gen,) = pipe.edit([EditRequest(instruction="x", image=PICTURE, decoder="generation", **SMALL)])
    assert gen.error is not None and gen.error.code == "task_not_loaded"
    both = NexusGen.from_pretrained(str(tiny_dir), tasks=["edit"], prefix_mode="forced")
    assert both.components.gen_dit is not None


@pytest.fixture(scope="module")
def pipes(tiny_dir: Path) -> tuple[NexusGen, NexusGen]:
    on_demand = NexusGen.from_pretrained(str(tiny_dir), tasks=["generate"], prefix_mode="forced")
    resident = NexusGen.from_pretrained(
        str(tiny_dir), tasks=["generate"], prefix_mode="forced", resident_text_encoders=True
    )
    return on_demand, resident


def test_empty_prompt_is_encoded_once_at_load(pipes: tuple[NexusGen, NexusGen]) -> None:
    on_demand, _ = pipes
    assert set(on_demand.text._t5) == {""} and set(on_demand.text._pooled) == {""}
    assert not on_demand.text.resident


def test_negative_prompts_give_the_same_images_either_way(pipes: tuple[NexusGen, NexusGen]) -> None:
    requests = [
        GenerateRequest(prompt="a red cube", cfg_scale=3.0, negative_prompt="blurry", **SMALL),
        GenerateRequest(prompt="a red cube", cfg_scale=3.0, **SMALL),
    ]
    images = [[r.image.tobytes() for r in pipe.generate(requests)] for pipe in pipes]
    assert images[0] == images[1]
    assert images[0][0] != images[0][1]  # the negative prompt reached the DiT
    assert set(pipes[0].text._t5) == {""}  # non-empty negatives are not cached
