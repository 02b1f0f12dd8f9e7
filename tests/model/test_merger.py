"""ImageEmbeddingMerger: shapes, positions, key names, equality with transformers Qwen2.5-VL layer.

See docs/model.md#editing-merger.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRotaryEmbedding,
)

from model.config import NUM_IMAGE_TOKENS, NUM_REF_TOKENS, MergerConfig
from model.merger import ImageEmbeddingMerger

CONFIG = MergerConfig(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    out_channels=32,
    mrope_section=(2, 3, 3),
)


def _merger(seed: int = 0) -> ImageEmbeddingMerger:
    torch.manual_seed(seed)
    merger = ImageEmbeddingMerger(CONFIG).eval()
    with torch.no_grad():
        for p in merger.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return merger


def test_output_shapes() -> None:
    merger = _merger()
    embeds = torch.randn(2, NUM_IMAGE_TOKENS, 64)
    ref = torch.randn(2, NUM_REF_TOKENS, 64)
    with torch.no_grad():
        assert tuple(merger(embeds, ref).shape) == (2, 405, 32)
        assert tuple(merger(embeds, None).shape) == (2, 81, 32)


def test_position_ids_on_the_72_grid() -> None:
    pos = _merger().position_ids(NUM_IMAGE_TOKENS, NUM_REF_TOKENS)
    assert tuple(pos.shape) == (3, 405)
    assert torch.all(pos[0] == 0)
    target, ref = pos[:, :81], pos[:, 81:]
    for j in (0, 1, 8, 9, 40, 80):
        r, c = divmod(j, 9)
        assert target[:, j].tolist() == [0, 4 * r, 4 * c]
    for j in (0, 1, 17, 18, 200, 323):
        r, c = divmod(j, 18)
        assert ref[:, j].tolist() == [0, 2 * r, 2 * c]
    assert target[1].max() == 32 and ref[1].max() == 34  # no offset between target and ref


def test_state_dict_keys_match_the_official_names() -> None:
    keys = set(_merger().state_dict())
    layer = "layers.0."
    expected = {layer + f"self_attn.{p}_proj.{s}" for p in "qkv" for s in ("weight", "bias")}
    expected |= {layer + "self_attn.o_proj.weight"}
    expected |= {layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    expected |= {layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
    expected |= {"projector.0.weight", "projector.1.weight", "projector.1.bias", "projector.2.weight"}
    expected |= {"projector.4.weight", "projector.4.bias", "projector.5.weight"}
    assert keys == expected


def test_layer_equals_transformers_decoder_layer_without_mask() -> None:
    merger = _merger()
    text_config = Qwen2_5_VLTextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    )
    text_config._attn_implementation = "eager"
    reference = Qwen2_5_VLDecoderLayer(text_config, layer_idx=0).eval()
    reference.load_state_dict(merger.layers[0].state_dict())
    rotary = Qwen2_5_VLRotaryEmbedding(text_config)

    hidden = torch.randn(2, 405, 64)
    positions = merger.position_ids(81, 324)
    with torch.no_grad():
        cos, sin = rotary(hidden, positions[:, None, :].expand(3, 2, 405))
        expected = reference(hidden, attention_mask=None, position_embeddings=(cos, sin))
        expected = expected[0] if isinstance(expected, tuple) else expected
        my_cos, my_sin = merger.rotary(positions, hidden.dtype)
        assert torch.allclose(my_cos, cos[0], atol=1e-6) and torch.allclose(my_sin, sin[0], atol=1e-6)
        actual = merger.layers[0](hidden, my_cos[None], my_sin[None])
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def test_bidirectional_and_batch_independent() -> None:
    merger = _merger()
    embeds = torch.randn(2, 81, 64)
    ref = torch.randn(2, 324, 64)
    with torch.no_grad():
        out = merger(embeds, ref)
        changed = ref.clone()
        changed[:, -1] += 1.0
        out2 = merger(embeds, changed)
        alone = merger(embeds[1:], ref[1:])
    assert not torch.allclose(out[:, 0], out2[:, 0])  # the first token sees the last one: no causal mask
    assert torch.allclose(alone[0], out[1], atol=1e-5)
