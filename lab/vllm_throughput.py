"""Throughput of vLLM with and without flashvlm, side by side in one run.

    .venv-vllm/bin/python lab/vllm_throughput.py --model scene-llava --budget 28 --requests 16

sends R requests at once (each a different image and question) to one engine per setting,
unpruned first, and reports requests per second, time to first token, prompt tokens, the
KV-cache blocks each request holds, and the vision tower's passes. Prefix caching and the
processor cache are off, and vLLM's encoder cache and the plug-in's vision cache are emptied
before each batch, so every batch pays its own encoder runs and prefill.

``--questions Q`` asks each image Q different questions (R requests over R / Q images, a
chat or a benchmark with several questions per image). Each budget then runs twice, with the
plug-in's vision cache off (the tower runs for every request: the text is part of each
image's cache key) and on (once per image). Stock vLLM keys its encoder cache by the image
alone: a request finds an image an earlier step encoded, while requests scheduled in the
same step each encode it. The last column counts the tower's passes and their inputs.

The same command is the GPU reference (pass ``--dtype bfloat16`` and a real model folder
there). Research tooling, outside the wheel: the requests are scenes of the demo workbench's
benchmark (``lab.scenes``, at the repository root).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flashvlm.errors import FlashVLMError
from flashvlm.selection import parse_budget

#: The small LLaVA the tests keep (2.75 M parameters trained on the demo's scenes): real weights, loads at once.
SCENE_LLAVA = Path(__file__).resolve().parents[1] / "tests" / "scene_llava"

# Run as a script, only lab/ itself is on the path: the repository root makes the package ``lab`` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class BenchRow:
    setting: str  # "unpruned", "METHOD K=BUDGET", or with --questions "METHOD K=BUDGET, vision cache off"
    requests: int  # R, sent at once
    images: int  # distinct images among them (R / Q)
    requests_per_second: float
    ttft_mean_ms: float  # time to first token, mean over requests
    ttft_p90_ms: float
    prompt_tokens: float  # mean per request
    kv_tokens: float  # mean tokens per request in the KV cache (prompt + output)
    kv_blocks: float  # mean KV-cache blocks per request (prompt + output, block_size tokens each)
    block_size: int
    seconds: float  # wall time of the batch
    tower_passes: int  # vision tower passes during the batch
    tower_inputs: int  # images (LLaVA-NeXT: views) those passes encoded


def synthetic_model_folder(name: str, scale: list[str], scratch: str) -> str:
    """A vLLM-loadable folder of a shipped benchmark config (e.g. ``llava-1.5-7b``), scaled and
    with random weights, that reads prompts with the demo model's tokenizer and processor.

    The demo vocabulary is a subset of any LLaVA vocabulary size, so the random model accepts
    its ids; only the placeholder id and the processor's image size are set to match.
    """
    import shutil

    import torch
    from transformers import AutoTokenizer

    from flashvlm.bench.models import build_model, load_config, parse_scale, scale_config

    MODEL_DIR = SCENE_LLAVA
    from flashvlm.integrations.vllm.export import export_for_vllm

    config = scale_config(load_config(name), parse_scale(scale))
    if config.model_type != "llava":
        raise FlashVLMError(f"--model {name!r}: the vLLM plug-in serves LLaVA-1.5 configs; got {config.model_type}")
    config.image_token_id = AutoTokenizer.from_pretrained(MODEL_DIR).convert_tokens_to_ids("<image>")
    destination = f"{scratch}/saved"
    build_model(config, torch.device("cpu"), torch.float32).save_pretrained(destination)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(MODEL_DIR / file, destination)
    processor = json.loads((MODEL_DIR / "processor_config.json").read_text())
    side = config.vision_config.image_size
    processor["image_processor"].update(crop_size={"height": side, "width": side}, size={"shortest_edge": side})
    processor["patch_size"] = config.vision_config.patch_size
    with open(f"{destination}/processor_config.json", "w") as handle:
        json.dump(processor, handle, indent=2)
    return str(export_for_vllm(destination, f"{scratch}/vllm"))


def demo_requests(model_path: str, count: int, questions: int = 1, seed: int = 0) -> list[dict]:
    """``count`` requests on scenes of the demo benchmark's test split: each scene with its own
    question, or with ``questions`` > 1, each scene asked that many different questions (the
    scene's own, then those of the scenes after it), in consecutive requests."""
    from transformers import AutoProcessor

    from flashvlm.loading import chat_prompt
    from lab.scenes import split_example

    processor = AutoProcessor.from_pretrained(model_path)
    requests, index = [], 0
    for first in range(0, count, questions):
        scene = split_example(seed, "test", index)
        image, asked = scene.render(), []
        while len(asked) < min(questions, count - first):
            question = split_example(seed, "test", index).question
            index += 1
            if question not in asked:  # the same (image, prompt) would be served from vLLM's caches
                asked.append(question)
        requests += [
            {"prompt": chat_prompt(processor, question), "multi_modal_data": {"image": image}} for question in asked
        ]
    return requests


def measure(model_path: str, setting: str, hf_overrides: dict | None, requests: list[dict], args) -> BenchRow:
    from vllm import LLM, SamplingParams

    from flashvlm.integrations.vllm.vision_cache import clear_vision_cache, count_tower_passes, take_tower_passes

    llm = LLM(
        model=model_path,
        hf_overrides=hf_overrides,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        max_num_seqs=len(requests),
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        disable_log_stats=False,  # per-request metrics (time to first token) need the stats
        seed=0,
    )
    llm.apply_model(count_tower_passes)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(requests[:1], sampling, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        # Every batch encodes its images anew: nothing from the warm-up or the batch before.
        llm.llm_engine.reset_encoder_cache()
        llm.apply_model(clear_vision_cache)
        llm.apply_model(take_tower_passes)
        start = time.perf_counter()
        outputs = llm.generate(requests, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        runs.append((seconds, outputs, llm.apply_model(take_tower_passes)[0]))
    # The median run by wall time: the CPUs this was written on are shared.
    seconds, outputs, passes = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    ttft = sorted(1000 * output.metrics.first_token_latency for output in outputs)
    tokens = [len(output.prompt_token_ids) + len(output.outputs[0].token_ids) for output in outputs]
    row = BenchRow(
        setting=setting,
        requests=len(requests),
        images=math.ceil(len(requests) / args.questions),
        requests_per_second=len(requests) / seconds,
        ttft_mean_ms=statistics.fmean(ttft),
        ttft_p90_ms=ttft[min(len(ttft) - 1, math.ceil(0.9 * len(ttft)) - 1)],
        prompt_tokens=statistics.fmean(len(output.prompt_token_ids) for output in outputs),
        kv_tokens=statistics.fmean(tokens),
        kv_blocks=statistics.fmean(math.ceil(count / block_size) for count in tokens),
        block_size=block_size,
        seconds=seconds,
        tower_passes=len(passes),
        tower_inputs=sum(passes),
    )
    del llm
    return row


def markdown_table(rows: list[BenchRow]) -> str:
    lines = [
        "| setting | R | images | req/s | TTFT mean (ms) | TTFT p90 (ms) | prompt tokens | KV tokens / request "
        "| KV blocks / request | tower passes (inputs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setting} | {row.requests} | {row.images} | {row.requests_per_second:.2f} | {row.ttft_mean_ms:.0f} | "
            f"{row.ttft_p90_ms:.0f} | {row.prompt_tokens:.0f} | {row.kv_tokens:.0f} | "
            f"{row.kv_blocks:.1f} (of {row.block_size} tokens) | {row.tower_passes} ({row.tower_inputs}) |"
        )
    return "\n".join(lines)


def write_section(args, table: str) -> None:
    """The table under the command that produced it, in a marked section of ``args.markdown``."""
    import os
    import platform
    import shlex

    from flashvlm.bench.tables import PERFORMANCE_PREAMBLE
    from flashvlm.files import update_markdown_section

    command = " ".join([".venv-vllm/bin/python lab/vllm_throughput.py", *map(shlex.quote, sys.argv[1:])])
    shape = f"{args.model} (SCALED: {' '.join(args.scale)})" if args.scale else args.model
    asked = f" over R / {args.questions} images, each asked {args.questions} questions" if args.questions > 1 else ""
    title = f"{shape}, {args.questions} questions per image" if args.questions > 1 else shape
    body = (
        f"## vLLM plug-in: {title}\n\n```bash\n{command}\n```\n\n"
        f"vLLM {_vllm_version()}, {args.dtype}, {os.cpu_count()} CPUs ({platform.machine()}); R requests sent at "
        f"once{asked}, {args.max_tokens} tokens each, median of {args.repeats} batches, prefix and processor caches "
        f"off, encoder and vision caches emptied before each batch.\n\n"
        f"{table}\n"
    )
    workload = f"-q{args.questions}" if args.questions > 1 else ""
    update_markdown_section(
        args.markdown, f"vllm-{args.model}-{'-'.join(args.scale) or 'full'}{workload}", body, PERFORMANCE_PREAMBLE
    )


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="scene-llava",
        help="a model folder; 'scene-llava' for the small scene-trained LLaVA in tests/scene_llava; or a shipped config "
        "(llava-1.5-7b, ...) built with random weights at --scale",
    )
    parser.add_argument(
        "--scale", nargs="*", default=[], help="with a shipped config: cpu, or lm_layers=4 width=0.25 ..."
    )
    parser.add_argument("--method", default="flashvlm", help="a method name, with a preset as flashvlm:release")
    parser.add_argument("--budget", nargs="+", default=["28"], help="budgets to compare with the unpruned model")
    parser.add_argument("--requests", type=int, default=16, help="R: requests sent at once")
    parser.add_argument(
        "--questions",
        type=int,
        default=1,
        help="Q: questions per image (R requests over R / Q images); with Q > 1 each budget also runs with the "
        "plug-in's vision cache off",
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="batches per setting; the median one is reported")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--markdown", help="also write the table as its own section of this file (docs/performance.md)")
    args = parser.parse_args(argv)
    try:
        args.budget = [parse_budget(text) for text in args.budget]
    except FlashVLMError as error:
        parser.error(str(error))
    for name in ("requests", "questions", "repeats", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1; got {getattr(args, name)}")
    return args


def settings_for(args) -> list[tuple[str, dict | None]]:
    """(row name, ``hf_overrides``) of each engine: unpruned, then each budget; with several
    questions per image, each budget with the vision cache off first."""
    settings: list[tuple[str, dict | None]] = [("unpruned", None)]
    for budget in args.budget:
        pruned = {"method": args.method, "budget": budget}
        if args.questions > 1:
            settings.append(
                (f"{args.method} K={budget}, vision cache off", {"flashvlm": {**pruned, "vision_cache_mb": 0}})
            )
        settings.append((f"{args.method} K={budget}", {"flashvlm": pruned}))
    return settings


def main(argv: list[str] | None = None) -> None:
    import os

    args = parse_args(argv)
    # LLM.apply_model sends this script's counters to the engine process (pickled functions).
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model
        if model_path == "scene-llava":
            from flashvlm.integrations.vllm.export import export_for_vllm

            model_path = str(export_for_vllm(SCENE_LLAVA, f"{scratch}/scene-llava"))
        elif not Path(model_path).is_dir():
            model_path = synthetic_model_folder(model_path, args.scale, scratch)
        requests = demo_requests(model_path, args.requests, args.questions)
        rows = [measure(model_path, name, overrides, requests, args) for name, overrides in settings_for(args)]
    table = markdown_table(rows)
    print(table)
    if args.markdown:
        write_section(args, table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=1)


if __name__ == "__main__":
    main()
