"""Drive vLLM from the tests: each run of engines is a subprocess (``vllm_job.py``), because
vLLM starts processes of its own and keeps global state per process (plug-ins load once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

JOB_SCRIPT = Path(__file__).with_name("vllm_job.py")
#: Generous: one job imports vLLM (~15-30 s on two shared cores) and builds a few engines.
JOB_TIMEOUT_SECONDS = 900


def vllm_environment(cache_root: Path, plugins: bool = True) -> dict[str, str]:
    """Settings that let vLLM run small models on a shared CPU, offline."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        VLLM_CACHE_ROOT=str(cache_root),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TOKENIZERS_PARALLELISM="false",
    )
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # an allow-list naming no plug-in: stock vLLM
    return env


def run_job(job: dict, workdir: Path, plugins: bool = True, in_process: bool = True) -> dict:
    """Run ``vllm_job.py`` on ``job`` and return its results (see that script)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / "job.json", workdir / "result.json"
    job_file.write_text(json.dumps(job))
    env = vllm_environment(workdir / "cache", plugins)
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    completed = subprocess.run(
        [sys.executable, str(JOB_SCRIPT), str(job_file), str(result_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_SECONDS,
    )
    if completed.returncode != 0:
        raise AssertionError(f"vllm_job.py failed ({completed.returncode}):\n{completed.stderr[-6000:]}")
    return json.loads(result_file.read_text())
