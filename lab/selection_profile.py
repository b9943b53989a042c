"""Where a method's selection spends its time at N = 576 (LLaVA-1.5-7B widths): kernel
launches, host synchronisations and the top operators, from torch.profiler.

    python lab/selection_profile.py --device cuda --dtype bfloat16 --out profile.txt
"""

from __future__ import annotations

import argparse

import torch

from flashvlm import get_method
from flashvlm.bench.selection_cost import selection_inputs

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=["flashvlm", "flashvlm:release", "flashvlm:fast_diversity"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs = selection_inputs(576, 1024, 4096, 40, device, dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    parts = []
    for name in args.methods:
        method = get_method(name)
        for _ in range(3):
            method(inputs, 64)
        with torch.profiler.profile(activities=activities) as profile:
            method(inputs, 64)
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = profile.key_averages()
        launches = sum(event.count for event in events if event.key in LAUNCHES)
        syncs = sum(event.count for event in events if event.key in SYNCS)
        parts.append(
            f"== {name} at N = 576, K = 64 on {device.type}, {args.dtype}: {launches} kernel launches, {syncs} host syncs"
        )
        parts.append(events.table(sort_by="self_cpu_time_total", row_limit=15))
    text = "\n".join(parts)
    print(text)
    with open(args.out, "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    main()
