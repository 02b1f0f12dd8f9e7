"""Engines on the tiny checkpoint: DeepSpeed (1 rank, then 2 CPU ranks over gloo) matches plain torch.

DeepSpeed initialises torch.distributed, which is process-global state, so every DeepSpeed run happens in
child processes (`python -m tests.model.test_engine RANK WORLD PORT CKPT OUT`); each rank computes the torch
reference itself and reports the differences as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model import engine as engine_mod
from model.plan import checkpoint_tensors, make_plan

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube on a table", "a small boat at sea"]
SEEDS = [7, 8]


# ---- the child process --------------------------------------------------------------------------------
def _run_stack(pipe, prompts: list[str]) -> tuple[torch.Tensor, list[np.ndarray], str]:  # type: ignore[no-untyped-def]
    """One-pass AR image embeddings [B,81,D], the images of a 2-step 256² generation and of an edit (edit
    DiT, merger, ViT), and a short understanding text (greedy decoding through the sharded lm_head)."""
    from PIL import Image

    from model.ar import generation_prompt
    from model.config import GENERATION_PREFIXES
    from model.requests import EditRequest, GenerateRequest, UnderstandRequest

    ar_prompts = [generation_prompt(p, "en") for p in prompts]
    enc, prefixes, _ = pipe._prefixes(ar_prompts, [GENERATION_PREFIXES["en"]] * len(prompts))
    embeds = pipe.ar.image_embeddings(enc, prefixes).float()
    requests = [
        GenerateRequest(prompt=p, width=256, height=256, steps=2, cfg_scale=3.0, seed=s)
        for p, s in zip(prompts, SEEDS, strict=True)
    ]
    images = [np.asarray(r.image) for r in pipe.generate(requests)]
    picture = Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3))
    edit = EditRequest(instruction="make it blue", image=picture, width=256, height=256, steps=2, seed=3)
    images += [np.asarray(r.image) for r in pipe.edit([edit])]
    text = pipe.understand([UnderstandRequest(instruction="what is this?", image=picture, max_new_tokens=6)])[
        0
    ].text
    return embeds, images, text


def child_main(rank: int, world: int, port: int, checkpoint: str, out: str, device: str = "cpu") -> None:
    """One rank: torch reference, then the deepspeed engine on the same inputs; rank 0 writes the diffs."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from model.pipeline import NexusGen

    ref = NexusGen.from_pretrained(checkpoint, device=device, engine="torch", prefix_mode="forced")
    ref_embeds, ref_images, ref_text = _run_stack(ref, PROMPTS)
    pipe = NexusGen.from_pretrained(checkpoint, device=device, engine="deepspeed", prefix_mode="forced")
    ds_embeds, ds_images, ds_text = _run_stack(pipe, PROMPTS)
    sharded = sorted({type(m).__name__ for m in pipe.components.edit_dit.modules()} & TP_LAYERS)
    report = {
        "world": int(torch.distributed.get_world_size()),
        "embed_max_abs": float((ds_embeds - ref_embeds).abs().max()),
        "embed_scale": float(ref_embeds.abs().max()),
        "pixel_max_abs": max(
            int(np.abs(a.astype(int) - b.astype(int)).max())
            for a, b in zip(ds_images, ref_images, strict=True)
        ),
        "images_identical": all(
            a.tobytes() == b.tobytes() for a, b in zip(ds_images, ref_images, strict=True)
        ),
        "same_text": ds_text == ref_text,
        "text": ds_text,
        "dit_tp_layers": sharded,
        "ar_tp_layers": sorted({type(m).__name__ for m in pipe.components.ar.modules()} & TP_LAYERS),
    }
    if world == 1:
        probe = nn.Linear(4, 4).to(torch.bfloat16)
        probe.register_buffer("inv_freq", torch.rand(4))  # fp32 on purpose, like a rotary embedding's
        kept = engine_mod._init_inference(probe, None).module.inv_freq.dtype == torch.float32
        report["fp32_buffer_kept"] = kept
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    from model.plan import checkpoint_tensors, make_plan, resident_bytes

    plan = make_plan(
        checkpoint_tensors(checkpoint), ("generate", "edit", "understand"), tp=world, dtype="fp32",
        resident_text_encoders=True, devices=[device] * world,
    )  # fmt: skip
    held = {"held": resident_bytes(pipe.components), "plan": plan.devices[rank].components}
    Path(f"{out}.rank{rank}").write_text(json.dumps(held))


TP_LAYERS = {
    "LinearLayer",
    "LinearAllreduce",
    "LmHeadLinearAllreduce",
    "LmHeadAnyRank",
    "PackedRowParallelLinear",
}


# ---- the tests ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(world: int, checkpoint: Path, tmp_path: Path, device: str = "cpu") -> dict:
    port, out = _free_port(), tmp_path / f"report-{world}.json"
    env = {
        k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}
    }
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.model.test_engine",
                str(r),
                str(world),
                str(port),
                str(checkpoint),
                str(out),
                device,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{log[-4000:]}"
    report = json.loads(out.read_text())
    report["memory"] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    return report


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def test_deepspeed_one_rank_matches_torch(checkpoint: Path, tmp_path: Path) -> None:
    report = _launch(1, checkpoint, tmp_path)
    assert report["world"] == 1
    assert report["embed_max_abs"] <= 1e-5
    assert report["images_identical"], report
    assert report["same_text"]
    assert report["dit_tp_layers"] == [] and report["ar_tp_layers"] == []  # one rank: nothing sharded
    assert report["fp32_buffer_kept"]  # init_inference's dtype cast does not touch fp32 buffers


def test_deepspeed_two_cpu_ranks_tensor_parallel_matches_one_rank(checkpoint: Path, tmp_path: Path) -> None:
    report = _launch(2, checkpoint, tmp_path)
    assert report["world"] == 2
    # the DiT is really sharded, including the packed single-block proj_out
    assert {"LinearLayer", "LinearAllreduce", "PackedRowParallelLinear"} <= set(report["dit_tp_layers"])
    assert {"LinearLayer", "LinearAllreduce", "LmHeadLinearAllreduce"} <= set(report["ar_tp_layers"])
    # only the summation order of the all-reduce differs
    assert report["embed_max_abs"] <= 1e-5 * max(1.0, report["embed_scale"])
    assert report["pixel_max_abs"] <= 1, report
    assert report["same_text"]
    # each rank holds exactly what the memory plan predicts for it (its shard, not the whole model)
    for rank in report["memory"]:
        assert rank["held"] == rank["plan"]
    first, second = (m["held"] for m in report["memory"])
    assert (
        first["gen_dit"]
        == second["gen_dit"]
        < 0.8
        * make_plan(checkpoint_tensors(checkpoint), ("generate",), dtype="fp32")
        .devices[0]
        .components["gen_dit"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deepspeed_one_rank_on_cuda_matches_torch(checkpoint: Path, tmp_path: Path) -> None:
    report = _launch(1, checkpoint, tmp_path, device="cuda")
    assert report["embed_max_abs"] <= 1e-2 * max(1.0, report["embed_scale"])  # bf16
    assert report["pixel_max_abs"] <= 2, report


# ---- in-process checks (no torch.distributed needed) ----------------------------------------------------
def test_unknown_engine_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        engine_mod.apply_engine(None, "tensorrt", "cpu")  # type: ignore[arg-type]


def test_tensor_parallel_size_must_divide_the_heads(checkpoint: Path) -> None:
    from model.checkpoint import load_components

    components = load_components(checkpoint, "cpu", torch.float32)  # tiny: 2 KV heads, 2 DiT heads
    engine_mod.check_tensor_parallel_size(components, 2)
    with pytest.raises(ValueError, match="must divide the AR's 2 key/value heads"):
        engine_mod.check_tensor_parallel_size(components, 4)


def test_packed_row_parallel_weight_takes_each_ranks_slice_of_each_block() -> None:
    """What the 2-rank run relies on: rank r's columns are attn_r then mlp_r, not a contiguous slice."""
    linear = nn.Linear(10, 3)
    packed = engine_mod.PackedRowParallelLinear(linear, None, [[1, 1], [4, 4]], rank=1)
    assert torch.equal(packed.weight, torch.cat([linear.weight[:, 1:2], linear.weight[:, 6:10]], dim=1))
    with pytest.raises(ValueError, match="cover 8 of 10"):
        engine_mod.PackedRowParallelLinear(linear, None, [[1, 1], [3, 3]], rank=0)


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
