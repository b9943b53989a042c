"""``text_tokens="question"``: only the user's own words guide a text-guided method.

The question's tokens are found in the prompt whatever the chat template wrapped around
it and however the tokenizer marks spaces; a batch gives one question per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from families import case_named, tiny_model
from families.llava import NUM_PATCHES, tiny_llava_processor
from families.shared import IMAGE_TOKEN_ID, left_pad, random_pixels

import flashvlm
from flashvlm import FlashVLMError, TokenSelector
from flashvlm.adapters.sequence import question_token_mask
from flashvlm.loading import chat_prompt
from flashvlm.selection import get_method

#: Chat templates of the supported families, as their processors render one image and one question.
TEMPLATES = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><image><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gemma3": "<bos><start_of_turn>user\n<start_of_image><image><end_of_image>\n\n{question}<end_of_turn>\n<start_of_turn>model\n",
    "smolvlm": "<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:",
}
SPECIAL = ["<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<bos>"]
SPECIAL += ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<end_of_utterance>"]
QUESTIONS = ["What colour is the small circle?", "How many red squares are there, left of the cat?"]


def trained_tokenizer(spaces: str, lowercase: bool = False):
    """A small BPE tokenizer trained on the spot: byte-level ("Ġ" spaces, as GPT-2/Qwen/Llama 3)
    or metaspace ("▁" spaces, as SentencePiece Llama/Gemma); ``lowercase`` adds a normalizer
    that lowercases (as the shipped demo model's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    if lowercase:
        core.normalizer = normalizers.Lowercase()
    if spaces == "byte_level":
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Metaspace()
        alphabet = []
    corpus = [template.format(question=q) for template in TEMPLATES.values() for q in QUESTIONS] * 3
    corpus += ["what is the colour of the shape", "how many are there", "the red square and the cat"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=alphabet)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<bos>")


@pytest.mark.parametrize("template", TEMPLATES, ids=str)
@pytest.mark.parametrize("spaces", ["byte_level", "metaspace"])
@pytest.mark.parametrize("lowercase", [False, True], ids=["cased", "lowercasing"])
def test_the_question_is_found_in_every_template_and_batch_row(template, spaces, lowercase):
    tokenizer = trained_tokenizer(spaces, lowercase)
    rows = [tokenizer(TEMPLATES[template].format(question=q))["input_ids"] for q in QUESTIONS]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])  # left padded
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    mask = question_token_mask(tokenizer, input_ids, attention_mask, QUESTIONS)
    for row, question in enumerate(QUESTIONS):
        words = tokenizer.decode(input_ids[row][mask[row]].tolist())
        expected = question.lower() if lowercase else question
        assert "".join(words.split()) == "".join(expected.split()), words
        assert not bool((mask[row] & (attention_mask[row] == 0)).any())


def test_a_row_without_question_keeps_its_prompt_and_a_missing_question_is_named():
    tokenizer = trained_tokenizer("byte_level")
    ids = torch.tensor([tokenizer(TEMPLATES["qwen"].format(question=QUESTIONS[0]))["input_ids"]])
    mask = torch.ones_like(ids)
    assert bool(question_token_mask(tokenizer, ids, mask, [None]).all())
    with pytest.raises(FlashVLMError, match="batch row 0: question 'How many red.*' does not appear in its prompt"):
        question_token_mask(tokenizer, ids, mask, [QUESTIONS[1]])
    with pytest.raises(FlashVLMError, match=r"one per batch row \(1\); got 2"):
        question_token_mask(tokenizer, ids, mask, QUESTIONS)


@dataclass
class _RecordsTextTokens(TokenSelector):
    """Keeps the first tokens and records the text ids that guided each image."""

    name: ClassVar[str] = "records_text_tokens"
    requires: ClassVar[frozenset[str]] = frozenset({"text"})
    seen: ClassVar[list[int]] = []
    text_tokens: str = "question"

    def select(self, inputs, num_keep):
        _RecordsTextTokens.seen += inputs.text_mask.sum(dim=1).tolist()
        return torch.arange(num_keep).expand(inputs.batch_size, num_keep)


def llava_chat_batch(processor, questions: list[str]) -> dict:
    """The tiny LLaVA's chat prompts (one image each) as its processor tokenizes them."""
    tokenizer = processor.tokenizer
    rows = []
    for question in questions:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        ids = tokenizer(text)["input_ids"]
        place = ids.index(IMAGE_TOKEN_ID)
        rows.append(ids[:place] + [IMAGE_TOKEN_ID] * NUM_PATCHES + ids[place + 1 :])
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(len(rows)))


def test_only_the_question_guides_the_selection_in_a_batch():
    model, processor = tiny_model(case_named("llava")), tiny_llava_processor()
    questions = ["what is the color of the circle ?", "how many red square"]
    inputs = llava_chat_batch(processor, questions)
    _RecordsTextTokens.seen = []
    with flashvlm.prune(model, 4, _RecordsTextTokens(), tokenizer=processor), torch.no_grad():
        model.generate(**inputs, question=questions, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert sorted(_RecordsTextTokens.seen) == sorted(len(question.split()) for question in questions)
    # The whole prompt holds the template's role words and punctuation too.
    _RecordsTextTokens.seen = []
    with flashvlm.prune(model, 4, _RecordsTextTokens(text_tokens="prompt")), torch.no_grad():
        model(**inputs)
    assert min(_RecordsTextTokens.seen) > max(len(question.split()) for question in questions)


def test_image_placeholders_in_the_question_are_not_words_to_find():
    # flashvlm generate passes its --prompt, placeholders and all, as the question; in the
    # prompt each placeholder has become the template's image block and the visual tokens.
    from PIL import Image

    model, processor = tiny_model(case_named("llava")), tiny_llava_processor()
    question = "what is <image> the color of the circle ?"
    text = chat_prompt(processor, question)
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=[text], return_tensors="pt")
    _RecordsTextTokens.seen = []
    with flashvlm.prune(model, 4, _RecordsTextTokens(), tokenizer=processor), torch.no_grad():
        model(**inputs, question=question)
    assert _RecordsTextTokens.seen == [len(question.split()) - 1]


def test_the_flashvlm_question_preset_runs_and_says_what_it_needs():
    model, processor = tiny_model(case_named("llava")), tiny_llava_processor()
    question = "what is the color of the circle ?"
    inputs = llava_chat_batch(processor, [question])
    assert get_method("flashvlm:question").text_tokens == "question"
    with flashvlm.prune(model, 6, "flashvlm:question", tokenizer=processor) as pruner, torch.no_grad():
        logits = model(**inputs, question=question).logits
        model.generate(**inputs, question=[question], max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert torch.isfinite(logits).all() and pruner.last.images[0].num_kept == 6
    with flashvlm.prune(model, 6, "flashvlm:question"), pytest.raises(FlashVLMError, match="needs the question text"):
        model(**inputs, question=question)
    with pytest.raises(
        FlashVLMError, match="text_tokens must be one of 'prompt', 'question', 'before_image'; got 'user'"
    ):
        get_method("flashvlm", text_tokens="user")


def test_the_cli_passes_the_question(tiny_llava_folder, sample_image_file, capsys):
    from flashvlm.cli import main

    argv = ["generate", "--model", str(tiny_llava_folder), "--image", str(sample_image_file)]
    argv += ["--prompt", "how many?", "--budget", "8", "--method", "flashvlm:question", "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert "kept 8 of 64 visual tokens" in capsys.readouterr().out
