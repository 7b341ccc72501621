"""Phi3VConfig: strict construction from config.json, derived values, the architecture constants."""
import json

import pytest

from phi3v import Phi3VConfig
from phi3v.config import CROP, crop_grid_tokens


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "phi3"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}, "yarn"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8}}, "entries"),
    ({"num_key_value_heads": 2}, "grouped-query"),
    ({"embd_layer": {"embedding_cls": "image", "hd_transform_order": "glb_sub", "projection_cls": "mlp",
                     "use_hd_transform": True, "with_learnable_separator": True}}, "hd_transform_order"),
    ({"img_processor": {"image_dim_out": 32, "model_name": "openai/clip-vit-base-patch32",
                        "name": "clip_vision_model", "num_img_tokens": 144}}, "model_name"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_raises(tiny_ckpt, edit, message):
    d = json.loads((tiny_ckpt / "config.json").read_text())
    d.update(edit)
    with pytest.raises(ValueError, match=message):
        Phi3VConfig.from_dict(d)


def test_config_values(tiny_ckpt):
    cfg = Phi3VConfig.from_json(tiny_ckpt)
    assert cfg.head_dim == 16 and cfg.clip_layers_used == 1 and cfg.vision.hidden_size == 32
    assert abs(cfg.rope_scale - 1.274754878398196) < 1e-12
    assert abs(Phi3VConfig().rope_scale - 1.1902380714238083) < 1e-12
    d = json.loads((tiny_ckpt / "config.json").read_text())
    d["rope_scaling"]["type"] = "longrope"                         # newer transformers' spelling
    assert Phi3VConfig.from_dict(d).rope_long_factor == cfg.rope_long_factor
    with pytest.raises(Exception):
        cfg.hidden_size = 3                                        # frozen


def test_crop_grid_tokens_counts_every_row_separator():
    # an independent count of PHI3V_SPEC §5.8's layout: (h*w sub crops + 1 global) x 144 merged
    # tokens, a separator after each of the h*12 sub-grid rows and the 12 global rows, and glb_GN
    for h, w in [(1, 1), (2, 2), (3, 5), (1, 4), (4, 1)]:
        assert crop_grid_tokens(h, w) == (h * w + 1) * 144 + h * 12 + 12 + 1
    assert crop_grid_tokens(3, 5) == 2353 and crop_grid_tokens(2, 2) == 757     # PERF.md's samples
    assert CROP == 336
