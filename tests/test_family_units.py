"""A model family is one unit: every family the adapters serve has each of its parts, named
after its adapter's module, in the place a newcomer looks for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashvlm.adapters import ADAPTERS, family_name
from flashvlm.bench.families import RECORDS
from flashvlm.bench.models import load_config
from flashvlm.catalog import vllm_classes_table
from flashvlm.integrations.vllm import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
FAMILY_NAMES = [family_name(adapter) for adapter in ADAPTERS]


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
