"""The demo: a grounded VQA benchmark and a tiny LLaVA-1.5 trained on it by the project.

- :mod:`flashvlm.demo.scenes`: procedural scenes and questions, deterministic by seed;
- :mod:`flashvlm.demo.data`: splits as JSONL + PNG rows, and the token hit-rate geometry;
- :mod:`flashvlm.demo.model`: the tiny ``LlavaForConditionalGeneration``, tokenizer, processor;
- :mod:`flashvlm.demo.train`: the staged training pipeline (``python -m flashvlm.demo.train``);
- :mod:`flashvlm.demo.evaluate`: accuracy per question family, unpruned or at a budget.

``MODEL_DIR`` is the shipped model (a Hugging Face folder), ``EXAMPLES_DIR`` the shipped
example scenes with their questions.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
EXAMPLES_DIR = Path(__file__).parent / "examples"
