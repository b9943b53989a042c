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


def run_jobs(
    jobs: list[tuple[dict, Path, bool]], in_process: bool = True, extra_env: dict[str, str] | None = None
) -> list[dict]:
    """Run several ``(job, workdir, plugins)`` at once and return their results in order.

    Each job runs on one thread (``OMP_NUM_THREADS``), so two jobs side by side use both
    of the CI machine's cores: a module's stock and plug-in runs take the time of the longer.
    """
    running = []
    for job, workdir, plugins in jobs:
        workdir.mkdir(parents=True, exist_ok=True)
        job_file, result_file = workdir / "job.json", workdir / "result.json"
        job_file.write_text(json.dumps(job))
        env = vllm_environment(workdir / "cache", plugins)
        if in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.update(extra_env or {})
        log = open(workdir / "job.log", "w+")
        command = [sys.executable, str(JOB_SCRIPT), str(job_file), str(result_file)]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        running.append((process, log, result_file))
    results = []
    try:
        for process, log, result_file in running:
            returncode = process.wait(timeout=JOB_TIMEOUT_SECONDS)
            log.seek(0)
            if returncode != 0:
                raise AssertionError(f"vllm_job.py failed ({returncode}):\n{log.read()[-6000:]}")
            results.append(json.loads(result_file.read_text()))
            results[-1]["selections"] = recorded_selections(result_file)
    finally:
        for process, log, _ in running:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return results


def recorded_selections(result_file: Path) -> dict:
    """What ``vllm_job.py`` recorded of each engine's method calls (see its docstring)."""
    import torch

    path = Path(f"{result_file}.selections.pt")
    return torch.load(path, weights_only=False) if path.exists() else {}


def run_stock_and_plugin(job: dict, stock_engines: list[dict], plugin_engines: list[dict], workdir: Path):
    """Stock vLLM (plug-ins disabled) on ``stock_engines`` and the plug-in on ``plugin_engines``,
    side by side: the plug-in's engines are split over two processes (engines are independent:
    each is a fresh ``LLM``). Returns (stock results, plug-in results), each by engine name."""
    half = (len(plugin_engines) + 1) // 2
    parts = [plugin_engines[:half], plugin_engines[half:]]
    jobs = [({**job, "engines": stock_engines}, workdir / "stock", False)]
    jobs += [({**job, "engines": part}, workdir / f"plugin{place}", True) for place, part in enumerate(parts) if part]
    stock, *plugin = run_jobs(jobs)
    merged = {name: result for part in plugin for name, result in part.items() if name != "selections"}
    merged["selections"] = {name: calls for part in plugin for name, calls in part["selections"].items()}
    return stock, merged


#: The OpenAI-compatible server. (vllm-cpu's ``vllm`` command looks up the version of a
#: distribution named "vllm", which vllm-cpu is not, so the module is started directly.)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, hf_overrides: dict | None, workdir: Path, extra_args: tuple[str, ...] = ()):
    """``vllm serve``-equivalent on loopback (``extra_args``: more of its options); returns
    (process, base URL, log path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4"]
    command += list(extra_args)
    if hf_overrides is not None:
        command += ["--hf-overrides", json.dumps(hf_overrides)]
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env=vllm_environment(workdir / "cache"), stdout=log, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}", log_path


def wait_until_ready(process, base_url: str, timeout: float) -> bool:
    """Poll ``/health`` until it answers 200 (True) or the server exits or time runs out (False)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    return False


def stop(process, timeout: float = 30) -> None:
    """End a server this test started (its engine process exits with it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def post_json(url: str, payload: dict, timeout: float = 300) -> tuple[int, dict]:
    """The HTTP status and the JSON body of a POST, an error's (4xx, 5xx) too."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
