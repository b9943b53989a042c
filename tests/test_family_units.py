"""Every adapter has its family module in families/, named after the adapter's module, with
cases whose models it serves; and every family module's cases are in ``EVERY_CASE``."""

from __future__ import annotations

import importlib
from pathlib import Path

import families
import pytest
from families import EVERY_CASE, tiny_model

from flashvlm.adapters import ADAPTERS, adapter_for

FAMILIES = Path(families.__file__).parent


def stem(adapter: type) -> str:
    return adapter.__module__.rsplit(".", 1)[1]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=stem)
def test_every_adapter_has_a_family_module_with_cases_it_serves(adapter):
    path = FAMILIES / f"{stem(adapter)}.py"
    assert path.is_file(), f"{adapter.__name__} has no tests/families/{path.name}"
    cases = importlib.import_module(f"families.{stem(adapter)}").CASES
    assert cases, f"tests/families/{path.name} has no CASES"
    served = [case.name for case in cases if isinstance(adapter_for(tiny_model(case)), adapter)]
    assert served, f"no case of tests/families/{path.name} is served by {adapter.__name__}"


@pytest.mark.parametrize("case", EVERY_CASE, ids=lambda case: case.name)
def test_a_case_belongs_to_the_family_whose_adapter_serves_it(case):
    assert stem(type(adapter_for(tiny_model(case)))) == case.family
    assert case in importlib.import_module(f"families.{case.family}").CASES


def test_every_family_module_is_registered():
    on_disk = {path.stem for path in FAMILIES.glob("*.py")} - {"__init__", "shared"}
    assert {name for name in on_disk if not name.startswith("test_")} == {stem(adapter) for adapter in ADAPTERS}
    assert [module.__name__ for module in families.FAMILY_MODULES] == [f"families.{stem(a)}" for a in ADAPTERS]
