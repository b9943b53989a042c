"""A model family is one unit: every family the adapters serve has each of its parts, named
after its adapter's module (``flashvlm.adapters.family_name``), in the place a newcomer looks
for it: its tiny test case (tests/families/), its bench record (bench/families/), and its
vLLM class (integrations/vllm/) or a "refused at start-up" row in docs/vllm.md."""

from __future__ import annotations

import importlib
from pathlib import Path

import families
import pytest
from families import EVERY_CASE, tiny_model

from flashvlm.adapters import ADAPTERS, adapter_for, family_name
from flashvlm.bench.families import RECORDS
from flashvlm.bench.models import load_config
from flashvlm.catalog import vllm_classes_table
from flashvlm.integrations.vllm import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = Path(families.__file__).parent
FAMILY_NAMES = [family_name(adapter) for adapter in ADAPTERS]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=family_name)
def test_every_adapter_has_a_family_module_with_cases_it_serves(adapter):
    path = FAMILIES / f"{family_name(adapter)}.py"
    assert path.is_file(), f"{adapter.__name__} has no tests/families/{path.name}"
    cases = importlib.import_module(f"families.{family_name(adapter)}").CASES
    assert cases, f"tests/families/{path.name} has no CASES"
    served = [case.name for case in cases if isinstance(adapter_for(tiny_model(case)), adapter)]
    assert served, f"no case of tests/families/{path.name} is served by {adapter.__name__}"


@pytest.mark.parametrize("case", EVERY_CASE, ids=lambda case: case.name)
def test_a_case_belongs_to_the_family_whose_adapter_serves_it(case):
    assert family_name(type(adapter_for(tiny_model(case)))) == case.family
    assert case in importlib.import_module(f"families.{case.family}").CASES


def test_every_family_module_is_registered():
    on_disk = {path.stem for path in FAMILIES.glob("*.py")} - {"__init__", "shared"}
    assert {name for name in on_disk if not name.startswith("test_")} == set(FAMILY_NAMES)
    assert [module.__name__ for module in families.FAMILY_MODULES] == [f"families.{name}" for name in FAMILY_NAMES]


def test_every_family_has_a_bench_record_and_every_record_a_family():
    assert sorted(RECORDS) == sorted(FAMILY_NAMES)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=family_name)
def test_a_vllm_class_lives_in_the_module_of_its_family(adapter):
    served = {name: ARCHITECTURES[name] for name in adapter.architectures if name in ARCHITECTURES}
    module = f"flashvlm.integrations.vllm.{family_name(adapter)}"
    assert all(path.split(":")[0] == module for path in served.values()), served
    # A family without one is named in docs/vllm.md's generated table as refused at start-up.
    if not served:
        refused = [line for line in vllm_classes_table().splitlines() if "refused at start-up" in line]
        assert all(any(f"`{name}`" in line for line in refused) for name in adapter.architectures)


def test_every_vllm_class_serves_a_family_the_adapters_serve():
    architectures = {name for adapter in ADAPTERS for name in adapter.architectures}
    assert set(ARCHITECTURES) <= architectures


@pytest.mark.parametrize("path", sorted((ROOT / "src/flashvlm/bench/configs").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_bench_config_belongs_to_a_family_record(path):
    config = load_config(str(path))
    assert any(config.model_type in record.model_types for record in RECORDS.values())
