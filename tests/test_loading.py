"""``flashvlm.loading``: model folders, hub ids, devices and images fail with one line that
names the problem, before any weights load; images arrive upright and in 8-bit RGB."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flashvlm.cli import main
from flashvlm.errors import FlashVLMError, UnsupportedModelError
from flashvlm.loading import check_device, load_image, load_model


@pytest.fixture
def folder(tiny_llava_folder, tmp_path):
    """A copy of the tiny LLaVA folder that a test may break."""
    return shutil.copytree(tiny_llava_folder, tmp_path / "model")


def load_error(folder, **kwargs) -> str:
    with pytest.raises(FlashVLMError) as caught:
        load_model(str(folder), **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_folder_without_weights_is_named_with_what_it_lacks(folder):
    (folder / "model.safetensors").unlink()
    assert load_error(folder) == f"{folder} has no weights " + (
        "(model.safetensors, pytorch_model.bin, model.safetensors.index.json, pytorch_model.bin.index.json)"
    )


def test_truncated_weights_are_found_before_loading(folder):
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as file:
        file.truncate(size - 100)
    assert load_error(folder) == f"{weights} is truncated: {size - 100} of {size} bytes (copy or download it again)"
    with weights.open("r+b") as file:
        file.truncate(4)
    assert "is truncated or not a safetensors file" in load_error(folder)


def test_a_missing_shard_is_named(folder):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index["weight_map"]["model.embed"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(folder)
    assert message == (
        f"{folder} is missing weight shard(s) model-00002-of-00002.safetensors listed in model.safetensors.index.json"
    )


def rewrite_weights(folder, edit) -> None:
    """Rewrite the folder's model.safetensors with ``edit`` applied to its tensors (a dict, changed in place)."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_an_error_naming_them(folder, sample_image_file, capsys):
    def drop_projector(tensors):
        for name in [name for name in tensors if "multi_modal_projector." in name]:
            del tensors[name]

    rewrite_weights(folder, drop_projector)
    message = load_error(folder)
    assert message.startswith(f"{folder} lacks weights for 4 of the model's tensors (")
    for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        assert f"multi_modal_projector.{name}" in message
    assert message.endswith("): they would be random; use a complete checkpoint")
    code = main(["generate", "--model", str(folder), "--image", str(sample_image_file), "--prompt", "what ?"])
    assert code == 2 and "lacks weights for 4" in capsys.readouterr().err


def test_unexpected_weights_are_an_error_naming_them(folder):
    rewrite_weights(folder, lambda tensors: tensors.update({"model.stray.weight": torch.zeros(2)}))
    assert load_error(folder) == (
        f"{folder} holds 1 weight the model has no place for (model.stray.weight): "
        "is it a checkpoint of another architecture or version?"
    )


@pytest.mark.parametrize("kind, removed", [("processor", "processor_config.json"), ("tokenizer", "tokenizer.json")])
def test_a_folder_without_processor_files_is_named(folder, kind, removed):
    (folder / removed).unlink()
    if kind == "tokenizer":
        (folder / "tokenizer_config.json").unlink()
    assert load_error(folder).startswith(f"{folder} has no {kind} files (")


def test_a_folder_without_config_is_named(folder):
    (folder / "config.json").unlink()
    assert load_error(folder) == f"no model folder with a config.json at {folder}"


def test_an_unreachable_hub_id_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = load_error("nobody/no-such-model")
    assert message.startswith("could not load a model config from 'nobody/no-such-model' (not a local folder")


def test_a_config_without_architectures_is_read_by_its_model_type(folder):
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    del config["architectures"]
    config_file.write_text(json.dumps(config))
    model, _ = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    config["model_type"] = "clip_vision_model"
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="names no architectures, and its model_type 'clip_vision_model'"):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:1"])
def test_a_missing_device_is_refused_before_any_weights_load(folder, device, monkeypatch):
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("weights were loaded before the device was checked")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", must_not_load)
    assert f"device {device!r} was requested but this machine has no" in load_error(folder, device=device)


def test_device_names_are_checked():
    assert check_device("cpu") == torch.device("cpu")
    for name, problem in (("bogus", "unknown device"), ("meta", "unsupported device")):
        with pytest.raises(FlashVLMError, match=f"{problem} '{name}'; use auto, cpu, cuda, cuda:N or mps"):
            check_device(name)


def test_the_cli_reports_a_broken_folder_in_one_line(folder, sample_image_file, capsys):
    (folder / "model.safetensors").unlink()
    code = main(["generate", "--model", str(folder), "--image", str(sample_image_file), "--prompt", "what ?"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "has no weights" in err


# -- images -----------------------------------------------------------------------------------------


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_float_image_is_read_in_its_own_range(tmp_path, scale):
    path = tmp_path / "float.tiff"
    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(ramp * np.float32(scale)).save(path)
    assert Image.open(path).mode == "F"
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 0], np.round(ramp * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("values", "message"),
    [((-1.0, 0.5), "float pixels from -1 to 0.5"), ((0.0, 300.0), "float pixels from 0 to 300"), ((0.0, np.nan), "")],
)
def test_a_float_image_outside_both_ranges_is_refused(tmp_path, values, message):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([values, values], dtype=np.float32)).save(path)
    expected = f"image {path} has {message or 'float pixels that are not finite (NaN or infinity)'}"
    with pytest.raises(FlashVLMError, match=re.escape(expected)):
        load_image(path)


def test_the_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be turned 90 degrees clockwise to be upright
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top_row = np.asarray(upright)[2]  # the left band is now at the top
    assert top_row[:, 0].min() > 200 and top_row[:, 1].max() < 60


def test_a_png_claiming_a_huge_size_is_refused_in_one_line(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 20000 x 20000, 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(FlashVLMError, match=f"image {path} is too large to open safely") as caught:
        load_image(path)
    assert "\n" not in str(caught.value)
