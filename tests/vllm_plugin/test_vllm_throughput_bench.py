"""The documented vLLM throughput commands (docs/vllm.md, docs/performance.md) start in the vLLM
environment, and the questions-per-image one docs/vllm.md gives runs end to end at the smallest size.

tests/test_documented_commands.py checks their arguments and imports in the main environment;
this is the part that needs vLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys

from test_documented_commands import ALL_COMMANDS, REPO, python_arguments, python_environment
from vllm_harness import vllm_environment

SCRIPT = "lab/vllm_throughput.py"
THROUGHPUT_COMMANDS = [command for command in ALL_COMMANDS if SCRIPT in command.argv[1:2]]
#: Appended to the documented arguments (argparse keeps the last value): one budget, four
#: requests over two images (two questions each) of two tokens, one batch. About 35 s on two
#: shared cores with the engines in-process.
SMALLEST = ["--budget", "28", "--requests", "4", "--questions", "2", "--repeats", "1", "--max-tokens", "2"]


def test_the_throughput_commands_are_documented():
    assert {command.document.name for command in THROUGHPUT_COMMANDS} >= {"vllm.md", "performance.md"}
    with_questions = {command.document.name for command in THROUGHPUT_COMMANDS if "--questions" in command.argv}
    assert with_questions >= {"vllm.md", "performance.md"}


def test_the_script_starts_in_the_vllm_environment():
    done = subprocess.run(
        [sys.executable, SCRIPT, "--help"], cwd=REPO, env=python_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--budget" in done.stdout and "--questions" in done.stdout


def test_several_questions_per_image_compare_the_vision_cache_off_and_on():
    from lab.vllm_throughput import parse_args, settings_for

    one = settings_for(parse_args(["--budget", "28"]))
    assert one == [("unpruned", None), ("flashvlm K=28", {"flashvlm": {"method": "flashvlm", "budget": 28}})]
    several = settings_for(parse_args(["--budget", "28", "--questions", "4"]))
    off = {"flashvlm": {"method": "flashvlm", "budget": 28, "vision_cache_mb": 0}}
    assert several == [one[0], ("flashvlm K=28, vision cache off", off), one[1]]


def test_the_documented_questions_per_image_command_runs_at_the_smallest_size(tmp_path):
    # It runs every engine the plain command runs (unpruned, one per budget), and the vision cache off.
    (command,) = [c for c in THROUGHPUT_COMMANDS if c.document.name == "vllm.md" and "--questions" in c.argv]
    rows_file, section_file = tmp_path / "rows.json", tmp_path / "section.md"
    env = vllm_environment(tmp_path / "cache")
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=python_environment()["PYTHONPATH"])
    argv = [*python_arguments(command), *SMALLEST, "--json", str(rows_file), "--markdown", str(section_file)]
    done = subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    rows = {row["setting"]: row for row in json.loads(rows_file.read_text())}
    assert set(rows) == {"unpruned", "flashvlm K=28, vision cache off", "flashvlm K=28"}
    assert {row["images"] for row in rows.values()} == {2}
    assert rows["flashvlm K=28"]["prompt_tokens"] < rows["unpruned"]["prompt_tokens"]
    # The text is part of each image's key: off, every request runs the tower; on, every image once.
    assert rows["flashvlm K=28, vision cache off"]["tower_inputs"] == 4
    assert rows["flashvlm K=28"]["tower_inputs"] == 2
    # The section names the command that made it, as the docs' tables print it.
    assert f".venv-vllm/bin/python {SCRIPT} " + " ".join(argv) in section_file.read_text()
