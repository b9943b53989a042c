"""The demo's tiny LLaVA-1.5: config, word-level tokenizer and processor, built offline.

The result is a stock ``LlavaForConditionalGeneration`` with a CLIP vision tower, the
LLaVA MLP projector and a Llama language model, saved as an ordinary Hugging Face
folder, so every code path that serves ``llava-hf/llava-1.5-7b-hf`` serves it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .scenes import IMAGE_SIZE, PATCH_SIZE, vocabulary_words

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
#: CLIP's normalisation constants, as the processor applies them.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:") as a chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class ModelSize:
    """Widths and depths of the two towers (the presets of the training script pick them)."""

    vision_width: int = 128
    vision_layers: int = 4  # the last one is unused: features come from layer -2, as in LLaVA-1.5
    vision_heads: int = 4
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 4


def vocabulary() -> dict[str, int]:
    """Token ids: specials first, then every word the benchmark uses, then the image token."""
    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for word in vocabulary_words():
        vocab.setdefault(word, len(vocab))
    vocab[IMAGE] = len(vocab)
    return vocab


def build_tokenizer():
    """A word-level fast tokenizer: lower-cases, splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(IMAGE, "isolated"), pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE},
    )


def build_processor():
    """A LlavaProcessor: PIL CLIP image processing at 224 px, the word-level tokenizer, LLaVA-1.5 chat."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: ModelSize | None = None) -> LlavaConfig:
    size = size or ModelSize()
    vocab = vocabulary()
    vision = CLIPVisionConfig(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=size.vision_width,
    )
    text = LlamaConfig(
        hidden_size=size.text_width,
        intermediate_size=int(8 / 3 * size.text_width),
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        vocab_size=len(vocab),
        max_position_embeddings=512,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab[IMAGE],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=vocab[PAD],
    )
    config.flashvlm_demo_size = asdict(size)
    return config


def build_model(size: ModelSize | None = None, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(size))
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = vocabulary()[EOS]
    model.generation_config.bos_token_id = vocabulary()[BOS]
    return model


def feature_layer_index(model: LlavaForConditionalGeneration) -> int:
    """Index of the encoder layer whose output LLaVA projects (hidden_states[-2] -> layers[-2])."""
    layers = len(model.model.vision_tower.encoder.layers)
    feature_layer = model.config.vision_feature_layer
    return (feature_layer if feature_layer >= 0 else layers + 1 + feature_layer) - 1


def vision_hidden_states(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the encoder layers up to LLaVA's feature layer, CLS included: [(B, 1+N, C), ...].

    Layers past the feature layer do not affect the VLM's output, so they are not run.
    """
    tower = model.model.vision_tower
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    outputs = []
    for layer in tower.encoder.layers[: feature_layer_index(model) + 1]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        outputs.append(hidden)
    return outputs


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's visual features (layer -2, CLS dropped): (B, N, C)."""
    return vision_hidden_states(model, pixel_values)[-1][:, 1:]


def multimodal_logits(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The VLM's logits, computed as ``model(...)`` does but without the unused last vision layer.

    input_ids, attention_mask: (B, L) with N image placeholders per row; pixel_values (B, 3, H, W).
    ``positions`` (B, L) bool limits the lm_head to the positions that are scored.
    """
    embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
    projected = model.model.multi_modal_projector(image_features(model, pixel_values))  # (B, N, D)
    is_image = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    if positions is not None:
        return model.lm_head(hidden[positions])  # (P, V)
    return model.lm_head(hidden)


def pixel_tensor(images) -> torch.Tensor:
    """What the processor makes of 224 px RGB images, without the processor's per-image overhead."""
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0  # (B, H, W, 3)
    mean, std = np.array(IMAGE_MEAN, dtype=np.float32), np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy((array - mean) / std).permute(0, 3, 1, 2).contiguous()
