"""The lmms-eval model: any flashvlm-supported Hugging Face VLM, pruned by any method.

    python -m lmms_eval --model flashvlm \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=flashvlm,budget=64 \\
        --tasks gqa,pope --batch_size 8

``method`` (a name, or ``NAME:PRESET``) and ``budget`` (``64``, ``0.25``, ``25%``;
``1.0`` keeps every token) are required, so that both are always written to the
results' ``config.model_args``. Any other model argument is a parameter of the method
(``text_weight=0.3``). What was kept is recorded twice: per sample, as ``token_counts``
(``input_tokens`` = positions the language model prefilled: text + kept visual
tokens), and per run in ``throughput`` (``avg_visual_tokens_kept_per_image`` and
``avg_visual_tokens_per_image``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ...errors import FlashVLMError
from ...loading import chat_prompt, load_model, to_rgb
from ...patch import prune
from ...selection import Budget, get_method, parse_budget, validate_budget


def budget_from_argument(value: object) -> Budget:
    """A budget from lmms-eval's parsed ``--model_args`` (an int, a float or a string like ``25%``)."""
    if isinstance(value, str):
        return parse_budget(value)
    return validate_budget(value)


@dataclass
class KeptTokens:
    """Running totals of what the selection kept, for the run's throughput record."""

    images: int = 0
    visual_tokens: int = 0  # before selection, summed over images
    visual_tokens_kept: int = 0
    samples: int = 0
    prefill_tokens: int = 0  # positions the language model prefilled, summed over samples
    generated_tokens: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        per_image = max(self.images, 1)
        return {
            "visual_tokens_per_image": self.visual_tokens / per_image,
            "visual_tokens_kept_per_image": self.visual_tokens_kept / per_image,
            "prefill_tokens_per_sample": self.prefill_tokens / max(self.samples, 1),
        }


class PrunedVLM(lmms):
    """A Hugging Face VLM whose visual tokens are cut to ``budget`` by ``method`` before the LM runs."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        budget: object = None,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; unused
        **method_params,
    ) -> None:
        super().__init__()
        if method is None or budget is None:
            raise FlashVLMError(
                "the flashvlm model needs method= and budget= in --model_args (e.g. method=flashvlm,budget=64; "
                "budget=1.0 keeps every visual token), so that both are recorded with the results"
            )
        self.method = str(method)
        self.budget = budget_from_argument(budget)
        self.selector = get_method(self.method, **method_params)  # rejects unknown methods and parameters early
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise FlashVLMError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        self.batch_size_per_device = int(batch_size)

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            # Data parallel: one full model per process, lmms-eval shards the documents.
            device = f"cuda:{self.accelerator.local_process_index}"
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        self._model, self.processor = load_model(pretrained, device=device or "auto", dtype=dtype)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pretrained = pretrained
        logger.info(f"flashvlm: {pretrained} with method={self.method}, budget={self.budget}")

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # -- prompts --------------------------------------------------------------------------
    def _document(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, doc: dict) -> list[Image.Image]:
        visuals = doc_to_visual(doc) or []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise FlashVLMError(
                    f"the flashvlm lmms-eval model takes image tasks; got a {type(visual).__name__} visual "
                    "(video and audio inputs are not supported)"
                )
        try:
            return [to_rgb(visual) for visual in visuals]
        except FlashVLMError as error:
            raise FlashVLMError(f"an lmms-eval image visual {error}") from None

    def _inputs(self, contexts: list[str], images_per_row: list[list[Image.Image]]) -> dict:
        """Left-padded model inputs: each row is the model's chat format around its context."""
        prompts = [
            chat_prompt(self.processor, context, len(images)) for context, images in zip(contexts, images_per_row)
        ]
        images = [image for row in images_per_row for image in row]
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        # Longest prompts first (memory errors show at once), grouped by generation settings.
        collator = lmms_utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        totals = KeptTokens()
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="flashvlm responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            images = [
                self._images(doc_to_visual, self._document(task, split, doc_id))
                for doc_to_visual, doc_id, task, split in zip(doc_to_visuals, doc_ids, tasks, splits)
            ]
            results.extend(self._generate_batch(list(contexts), images, dict(all_gen_kwargs[0]), totals))
            progress.update(len(chunk))
        progress.close()
        log_metrics(
            total_elapsed_time=totals.seconds,
            total_gen_tokens=totals.generated_tokens,
            avg_speed=totals.generated_tokens / totals.seconds if totals.seconds > 0 else 0.0,
            additional_metrics={**totals.metrics(), "budget": self.budget, "method": self.method},
        )
        return collator.get_original(results)

    def _generate_batch(
        self, contexts: list[str], images: list[list[Image.Image]], gen_kwargs: dict, totals: KeptTokens
    ) -> list[GenerationResult]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        settings = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or 1024),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            do_sample=do_sample,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if do_sample:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        inputs = self._inputs(contexts, images)
        prompt_length = inputs["input_ids"].shape[1]
        start = time.perf_counter()
        # Each context, as the user's words, lets a method with text_tokens="question" find them in its prompt.
        with prune(self._model, self.budget, self.selector, tokenizer=self.processor) as pruner, torch.inference_mode():
            output = self._model.generate(**inputs, **settings, question=contexts)
        totals.seconds += time.perf_counter() - start

        if pruner.last is not None:
            prefill_mask = pruner.last.model_kwargs["attention_mask"]
            for image in pruner.last.images:
                totals.images += 1
                totals.visual_tokens += image.num_tokens
                totals.visual_tokens_kept += image.num_kept
        else:  # no row had an image: nothing was pruned
            prefill_mask = inputs["attention_mask"]
        prefill_lengths = prefill_mask.sum(dim=1).tolist()

        results = []
        for row, new_tokens in enumerate(output[:, prompt_length:].tolist()):
            new_tokens = self._until_end_of_sequence(new_tokens)
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            totals.samples += 1
            totals.prefill_tokens += int(prefill_lengths[row])
            totals.generated_tokens += len(new_tokens)
            counts = TokenCounts(input_tokens=int(prefill_lengths[row]), output_tokens=len(new_tokens))
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def _until_end_of_sequence(self, tokens: list[int]) -> list[int]:
        """The generated tokens before the first end-of-sequence (later ones are padding)."""
        stops = self._model.generation_config.eos_token_id
        stops = set(stops if isinstance(stops, list) else [stops]) - {None}
        for position, token in enumerate(tokens):
            if token in stops:
                return tokens[:position]
        return tokens

    # -- scoring continuations ------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its (pruned) context, and whether greedy decoding gives it."""
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            doc = self._document(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            inputs = self._inputs([context], [self._images(doc_to_visual, doc)])
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            continuation_ids = continuation_ids.to(self.device)  # (1, C)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation_ids], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(continuation_ids)], dim=1)
            with prune(self._model, self.budget, self.selector, tokenizer=self.processor), torch.inference_mode():
                logits = self._model(
                    **inputs, question=[context]
                ).logits  # (1, L', V): pruning shortens L, the end stays aligned
            length = continuation_ids.shape[1]
            predicted = logits[:, -length - 1 : -1].float().log_softmax(dim=-1)  # (1, C, V)
            log_probability = predicted.gather(-1, continuation_ids[..., None]).sum()
            greedy = bool((predicted.argmax(dim=-1) == continuation_ids).all())
            results.append((float(log_probability), greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the flashvlm lmms-eval model does not run multi-round generation tasks")
