"""The demo model as a folder vLLM loads: ``python -m flashvlm.integrations.vllm.export DIR``.

transformers 5 saves a LLaVA's CLIP tower weights as ``vision_tower.embeddings.*`` (so does
the demo checkpoint); vLLM 0.32's LLaVA expects ``vision_tower.vision_model.*``, as the
llava-hf checkpoints have them. The copy renames those weights and links every other file,
so stock vLLM and the plug-in load the same folder and the original stays as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

_TOWER = "vision_tower."
_TOWER_MODEL = "vision_tower.vision_model."


def vllm_weight_name(name: str) -> str:
    """The name vLLM's LLaVA loader expects for one weight of a transformers-saved checkpoint."""
    if name.startswith(_TOWER) and not name.startswith(_TOWER_MODEL):
        return _TOWER_MODEL + name[len(_TOWER) :]
    return name


def export_demo_model(destination: str | Path) -> Path:
    """Write the vLLM-loadable demo folder to ``destination`` (created; reused if complete)."""
    from ...demo.model import demo_model_folder

    return export_for_vllm(demo_model_folder(), destination)


def export_for_vllm(source_folder: str | Path, destination: str | Path) -> Path:
    """A vLLM-loadable copy of a transformers-saved LLaVA folder (weights renamed, the rest linked)."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(source_folder).iterdir()):
        target = destination / source.name
        if target.exists():
            continue
        if source.suffix == ".safetensors":
            weights = load_file(source)
            save_file({vllm_weight_name(name): tensor for name, tensor in weights.items()}, target)
        else:
            target.symlink_to(source.resolve())
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("destination", help="folder to write (created)")
    print(export_demo_model(parser.parse_args(argv).destination))


if __name__ == "__main__":
    main()
