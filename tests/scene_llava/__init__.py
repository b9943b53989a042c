"""A 2.75 M-parameter LLaVA trained from scratch on scenes (near chance): a fixed small checkpoint for tests.

It was the demo model before the SmolLM2 one; tests keep it as a stock Hugging Face folder
whose weights are not random. ``FOLDER`` is the folder ``from_pretrained`` loads.
"""

from pathlib import Path

FOLDER = Path(__file__).parent
