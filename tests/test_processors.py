"""The real InternVL, SmolVLM/Idefics3 and Qwen3-VL processors without torchvision, pool on
multi-tile images, and the sequence helpers these families lean on."""

from __future__ import annotations

from conftest_families import build_tiny_idefics3

from flashvlm.adapters.sequence import pad_token_id


def test_the_pad_id_comes_from_the_language_models_config_first():
    model = build_tiny_idefics3(model_type="smolvlm")
    # SmolVLM's top-level pad id is a deprecated placeholder; the text config holds the real one.
    model.config.pad_token_id, model.config.text_config.pad_token_id = 9, 5
    assert pad_token_id(model) == 5
    model.config.text_config.pad_token_id = None
    assert pad_token_id(model) == 9
