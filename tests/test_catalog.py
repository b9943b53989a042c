"""The docs' family and method tables are the code's: generated, and checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from families import EVERY_CASE, tiny_model

from flashvlm import adapter_for, supported_architectures
from flashvlm.adapters import ADAPTERS
from flashvlm.catalog import generated_sections

ROOT = Path(__file__).resolve().parent.parent
CASES = EVERY_CASE


@pytest.mark.parametrize(("place", "body"), generated_sections().items(), ids=lambda value: str(value)[:40])
def test_generated_tables_are_up_to_date(place, body):
    path, section = place
    text = (ROOT / path).read_text()
    found = re.search(f"<!-- generated:{section}:start -->\n(.*?)\n<!-- generated:{section}:end -->", text, re.DOTALL)
    assert found, f"{path} has no {section} section"
    assert found.group(1) == body, f"{path} is stale: run `python -m flashvlm.catalog`"


def test_every_class_is_listed_and_every_family_has_a_tiny_model():
    table = generated_sections()[("README.md", "supported-models")]
    assert all(f"`{name}`" in table for name in supported_architectures())
    served = {type(adapter_for(tiny_model(case))) for case in CASES}
    assert served == set(ADAPTERS)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_what_a_family_lacks_is_what_its_tiny_model_lacks(case):
    assert adapter_for(tiny_model(case)).support.lacks == case.lacks
