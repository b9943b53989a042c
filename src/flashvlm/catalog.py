"""The tables the docs show about families and methods, generated from the code.

README's "Supported models" comes from each adapter's :class:`~flashvlm.adapters.base.FamilySupport`;
docs/methods.md's methods x families table from what each method ``requires`` and what
each family ``lacks``; docs/vllm.md's served classes from the plug-in's ``ARCHITECTURES``.
``python -m flashvlm.catalog`` rewrites every section;
``tests/test_catalog.py`` fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .adapters import ADAPTERS
from .files import update_markdown_section
from .integrations.vllm import ARCHITECTURES
from .selection import available_methods, get_method

#: (file, section) of each generated table, relative to the repository root.
SUPPORTED_MODELS = ("README.md", "supported-models")
METHODS_BY_FAMILY = ("docs/methods.md", "methods-by-family")
VLLM_CLASSES = ("docs/vllm.md", "served-classes")


def supported_models_table() -> str:
    """Markdown: every Hugging Face class with its saliency source, budget unit and positions."""
    lines = ["| Hugging Face class | encoder saliency | budget unit | positions |", "|---|---|---|---|"]
    for adapter in ADAPTERS:
        support = adapter.support
        classes = ", ".join(f"`{name}`" for name in adapter.architectures)
        lines.append(
            f"| {classes} ({support.name}) | {support.saliency} | {support.budget_unit} | {support.positions} |"
        )
    return "\n".join(lines)


def method_cell(method: str, adapter) -> str:
    """Whether ``method`` runs on the family of ``adapter``, in a few words."""
    missing = sorted(get_method(method).requires & adapter.support.lacks)
    if missing:
        return "no (needs " + ", ".join(f"`{need}`" for need in missing) + ")"
    if "pixel_values_videos" not in adapter.pixel_arguments:
        return "yes"
    if "grid" in get_method(method).requires:
        return "yes; video per frame only"
    return "yes (images, video)"


def compared_methods() -> list[str]:
    """Every registered method, plus the variants that let CLS-driven methods run on towers
    without a CLS token (attention received stands in for the CLS row)."""
    return [*available_methods(), "visionzip:received", "vispruner:received"]


def methods_by_family_table() -> str:
    """Markdown: one row per group of methods with the same cells, one column per family."""
    header = "| method | " + " | ".join(adapter.support.name for adapter in ADAPTERS) + " |"
    rows: dict[tuple[str, ...], list[str]] = {}
    for method in compared_methods():
        rows.setdefault(tuple(method_cell(method, adapter) for adapter in ADAPTERS), []).append(method)
    lines = [header, "|---" * (len(ADAPTERS) + 1) + "|"]
    for cells, methods in rows.items():
        lines.append("| " + ", ".join(f"`{method}`" for method in methods) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vllm_classes_table() -> str:
    """Markdown: every Hugging Face class ``flashvlm.prune`` serves, and the plug-in's class
    for it in vLLM, or that the switch is refused there at start-up."""
    lines = ["| Hugging Face class | family | vLLM plug-in |", "|---|---|---|"]
    for adapter in ADAPTERS:
        for name in adapter.architectures:
            served = ARCHITECTURES.get(name)
            cell = f"`{served.replace(':', '.')}`" if served else "refused at start-up: no vLLM class yet"
            lines.append(f"| `{name}` | {adapter.support.name} | {cell} |")
    return "\n".join(lines)


def generated_sections() -> dict[tuple[str, str], str]:
    return {
        SUPPORTED_MODELS: supported_models_table(),
        METHODS_BY_FAMILY: methods_by_family_table(),
        VLLM_CLASSES: vllm_classes_table(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashvlm.catalog",
        description="Regenerate the tables the docs generate from the code: README's supported models, "
        "docs/methods.md's methods x families, docs/vllm.md's served classes.",
    )
    parser.add_argument("root", nargs="?", default=".", help="the repository folder (default: .)")
    root = Path(parser.parse_args(argv).root)
    if not root.is_dir():
        parser.error(f"root must be the repository folder; got {str(root)!r}, which is not a folder")
    for (path, section), body in generated_sections().items():
        update_markdown_section(root / path, section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
