"""Sequence surgery every adapter shares: find the placeholders, drop the pruned ones, re-pad.

Nothing here knows a model family: these functions work on the (B, L) prompt tensors a
processor returns and on the keyword arguments of a Hugging Face forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FlashVLMError, QuestionNotFoundError


def require_argument(model_kwargs: dict[str, Any], name: str, needed_by: str) -> Any:
    """``model_kwargs[name]``, or a :class:`FlashVLMError` saying which input needs it."""
    value = model_kwargs.get(name)
    if value is None:
        raise FlashVLMError(f"{needed_by} needs {name} alongside it (as the model's processor returns them)")
    return value


def prompt_tensors(model_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (all ones when not given), both (B, L)."""
    input_ids = model_kwargs.get("input_ids")
    if input_ids is None:
        raise FlashVLMError("flashvlm needs input_ids (not only inputs_embeds) to find the visual placeholders")
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask


def question_token_mask(
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    questions: list[str | None],
    ignored_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L) bool: the tokens that spell each row's question inside its prompt.

    Whatever the chat template put around the question (system prompt, role words,
    image markers, punctuation), the question's own characters are found in the prompt:
    every token is decoded on its own, special tokens and ``ignored_ids`` (the visual
    placeholders) count as no characters, whitespace is dropped (tokenizers mark spaces
    differently: "Ġ", "▁", or not at all), and the question's last occurrence in the row's
    real tokens is taken (the user's final message). The question is read as the tokenizer
    reads it (tokenized and decoded the same way, so a normalizer that lowercases or folds
    accents applies to both sides, and image placeholders in it count as nothing), else as
    written. Tokens overlapping it are the question's. A row whose question is None keeps
    its whole prompt. A question that is not found raises :class:`QuestionNotFoundError`.
    """
    batch, length = input_ids.shape
    if len(questions) != batch:
        raise FlashVLMError(f"question: give one per batch row ({batch}); got {len(questions)}")
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor encodes through its tokenizer
    ignored = set() if ignored_ids is None else set(ignored_ids.tolist())

    def characters(token_ids: list[int]) -> list[str]:
        """Each token's characters, whitespace dropped; none for a special or ignored token."""
        pieces = tokenizer.batch_decode([[token] for token in token_ids], skip_special_tokens=True)
        return ["" if token in ignored else "".join(piece.split()) for token, piece in zip(token_ids, pieces)]

    mask = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
    for row, question in enumerate(questions):
        if question is None:
            mask[row] = True
            continue
        if not isinstance(question, str) or not "".join(question.split()):
            raise FlashVLMError(f"question for row {row} must be a non-empty string or None; got {question!r}")
        positions = attention_mask[row].nonzero().squeeze(-1).tolist()
        owner = []
        stream = characters(input_ids[row, positions].tolist())
        for place, piece in enumerate(stream):
            owner += [place] * len(piece)
        prompt = "".join(stream)
        as_tokenized = "".join(characters(text_tokenizer(question, add_special_tokens=False)["input_ids"]))
        for target in (as_tokenized, "".join(question.split())):
            start = prompt.rfind(target) if target else -1
            if start >= 0:
                break
        else:
            raise QuestionNotFoundError(question, row)
        for place in sorted(set(owner[start : start + len(target)])):
            mask[row, positions[place]] = True
    return mask


def placeholder_rows(input_ids: torch.Tensor, token_id: int, lengths: list[int], what: str) -> list[int]:
    """Batch row of each visual item whose placeholders (``lengths`` tokens each) run row-major.

    Raises :class:`FlashVLMError` when the prompt's placeholder count does not match.
    """
    rows, _ = (input_ids == token_id).nonzero(as_tuple=True)
    if rows.numel() != sum(lengths):
        raise FlashVLMError(
            f"the prompt has {rows.numel()} {what} placeholder tokens, but the {len(lengths)} {what}(s) given "
            f"need {sum(lengths)}: build inputs with the model's processor"
        )
    starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)
    return rows.cpu()[starts].tolist() if lengths else []


def placeholder_runs(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unbroken runs of ``token_id`` in (B, L) ids, row by row, left to right: the row,
    first position and length of each, (R,) long tensors."""
    is_token = torch.nn.functional.pad((input_ids == token_id).int(), (1, 1))  # (B, L + 2)
    change = is_token[:, 1:] - is_token[:, :-1]  # +1 where a run starts, -1 just after it ends
    rows, starts = (change == 1).nonzero(as_tuple=True)
    ends = (change == -1).nonzero()[:, 1]
    return rows, starts, ends - starts


def pad_token_id(model: nn.Module) -> int:
    """The id new padding gets when pruned rows are re-padded.

    The language model's own config is read first: Idefics3/SmolVLM keep the pad id there,
    and their top-level ``pad_token_id`` is a deprecated placeholder (128002) that warns.
    """
    configs = (getattr(model.config, "text_config", None), model.config, getattr(model, "generation_config", None))
    for config in configs:
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(pad, int):
            return pad
    return 0


#: Fill values for per-token arguments when rows are re-padded (0 for any other).
_PER_TOKEN_FILL = {"labels": -100}


def rebuild_model_kwargs(
    model_kwargs: dict[str, Any],
    keep: torch.Tensor,
    vision_only: tuple[str, ...],
    pad_id: int,
    mm_encoder_outputs: dict[str, Any],
) -> tuple[dict[str, Any], torch.Tensor]:
    """Arguments for the language-model-only forward: rows without the dropped placeholders.

    keep: (B, L) bool. Every (B, L) tensor argument is compacted the same way (see
    :func:`compact_sequences`); the ``vision_only`` arguments are consumed. Returns the
    kwargs and the new attention mask (B, L').
    """
    input_ids, attention_mask = prompt_tensors(model_kwargs)
    batch, length = input_ids.shape
    pruned = {k: v for k, v in model_kwargs.items() if k not in vision_only}
    per_token = {
        name: (value, pad_id if name == "input_ids" else _PER_TOKEN_FILL.get(name, 0))
        for name, value in model_kwargs.items()
        if name != "attention_mask" and isinstance(value, torch.Tensor) and value.shape[:2] == (batch, length)
    }
    new_mask, compacted = compact_sequences(keep, attention_mask, per_token)
    pruned.update(compacted)
    pruned["attention_mask"] = new_mask
    pruned["mm_encoder_outputs"] = mm_encoder_outputs
    return pruned, new_mask


def text_embeddings(
    embedding: nn.Module, input_ids: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings of each row's text tokens, packed to the left.

    input_ids, text_mask: (B, L). Returns embeds (B, L_text, D) and mask (B, L_text),
    where L_text is the most text tokens any row has, so similarity costs O(N * L_text)
    rather than O(N * L) with all the image placeholders.
    """
    counts = text_mask.sum(dim=1)  # (B,)
    width = max(int(counts.max()), 1)
    # A stable sort of "is not text" brings each row's text positions to the front, in order.
    order = (~text_mask).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # (B, L_text)
    packed_mask = torch.arange(width, device=input_ids.device)[None, :] < counts[:, None]
    packed_ids = input_ids.gather(1, order).masked_fill(~packed_mask, 0)
    return embedding(packed_ids), packed_mask


def padding_side(attention_mask: torch.Tensor) -> str:
    """'right' if any row ends in padding, else 'left' (the generation convention)."""
    if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def compact_sequences(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    per_token: dict[str, tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Remove the positions where ``keep`` is False from every row (padding included), then re-pad.

    keep, attention_mask: (B, L). ``per_token`` maps names to ((B, L, ...) tensor, fill
    value for new padding). Rows shrink by different amounts, so they are re-padded to
    the longest on the side the input was padded on (left unless rows end in padding).
    Returns the new attention mask (B, L') and the compacted tensors.
    """
    batch, _ = keep.shape
    lengths = keep.sum(dim=1)  # (B,)
    new_length = int(lengths.max())
    offsets = new_length - lengths if padding_side(attention_mask) == "left" else torch.zeros_like(lengths)
    destination = offsets[:, None] + keep.long().cumsum(dim=1) - 1  # (B, L), valid where keep
    rows, columns = keep.nonzero(as_tuple=True)
    targets = destination[rows, columns]

    def compact(tensor: torch.Tensor, fill: int | float) -> torch.Tensor:
        out = tensor.new_full((batch, new_length, *tensor.shape[2:]), fill)
        out[rows, targets] = tensor[rows, columns]
        return out

    new_mask = compact(attention_mask, 0)
    return new_mask, {name: compact(tensor, fill) for name, (tensor, fill) in per_token.items()}
