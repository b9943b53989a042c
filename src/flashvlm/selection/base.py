"""The one selection contract every method meets, and the registry of methods.

A method is a small dataclass deriving from :class:`TokenSelector`. It declares what it
needs (``requires``), and implements :meth:`TokenSelector.select` for a batch of images
that share a token count ``N``. The base class validates the budget, short-cuts
``K >= N`` to "keep everything", sorts the result into raster order and checks the
shape, so a method is only its idea.

Nothing here imports transformers: adapters turn a model's tensors into
:class:`SelectionInputs`, methods turn those into a :class:`Selection`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import FlashVLMError, MethodUnavailableError
from .budget import Budget, resolve_budget

#: What a method may ask an adapter for.
#: - ``saliency``: one score per token from the vision encoder (CLS attention where the
#:   encoder has a CLS token, otherwise attention received);
#: - ``cls_attention``: specifically the CLS-to-patch attention row (CLIP-style towers);
#: - ``text``: the prompt's text embeddings in the language model's input space;
#: - ``projected``: the visual tokens after the projector, in the language model's space;
#: - ``keys``: the attention keys of the saliency layer, one row per token;
#: - ``grid``: the tokens' (rows, cols) raster layout;
#: - ``lm_attention``: the attention the last prompt token pays to each visual token inside
#:   the language model, at the layer the method names in ``lm_attention_layer``. Adapters
#:   get it from a partial language-model pass over the full sequence (see
#:   :meth:`flashvlm.adapters.ModelAdapter.visual_token_attention`), which costs extra;
#: - ``release_saliency``: a request more than a need: the saliency (or CLS row) computed
#:   with the arithmetic of the release the method restates, where the adapter knows it.
#:   The LLaVA-family adapters with a CLIP tower (and the vLLM LLaVA path) then give the
#:   CLS row as transformers 4.37.2's eager attention returns it to the LLaVA releases, in
#:   the tower's dtype (:func:`flashvlm.saliency.release_cls_attention`); every other
#:   adapter gives its ordinary float32 saliency, so it is available wherever saliency is.
REQUIREMENTS = frozenset(
    {"saliency", "cls_attention", "text", "projected", "keys", "grid", "lm_attention", "release_saliency"}
)


@dataclass
class SelectionInputs:
    """What a method may look at, for ``B`` images of ``N`` tokens each.

    Fields a method did not ask for may be ``None``.
    """

    features: torch.Tensor  # (B, N, C) vision features the projector consumes
    saliency: torch.Tensor | None = None  # (B, N) encoder saliency, post-softmax scale
    saliency_kind: str | None = None  # "cls" (CLS row) or "received" (column sums)
    projected: torch.Tensor | None = None  # (B, N, D) projector output
    text_embeds: torch.Tensor | None = None  # (B, L, D) LM input embeddings of the prompt
    text_mask: torch.Tensor | None = None  # (B, L) bool, True where text_embeds is real text
    #: (B, L) bool, True where a real text token comes before the prompt's first visual
    #: placeholder; None when the adapter does not say (only FlashVLM's
    #: ``text_tokens="before_image"``, the Qwen release's text, needs it).
    text_before_image: torch.Tensor | None = None
    keys: torch.Tensor | None = None  # (B, N, C_k) attention keys of the saliency layer
    key_heads: int | None = None  # heads the keys' C_k channels split into (C_k = heads * head_dim)
    grid_shape: tuple[int, int] | None = None  # (rows, cols) when the tokens form a raster grid
    lm_attention: torch.Tensor | None = None  # (B, N) last prompt token's attention in the LM, mean over heads

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass
class Selection:
    """The result of a selection for ``B`` images.

    ``indices`` are the kept token positions in raster order. Methods that merge tokens
    (VisionZip's contextual tokens) also return ``features``: the vision features to use
    at those positions instead of the originals.
    """

    indices: torch.Tensor  # (B, K) long, sorted ascending, unique per row
    features: torch.Tensor | None = None  # (B, K, C) replacement features, or None


#: What each requirement is, for error messages.
_REQUIREMENT_WORDS = {
    "saliency": "per-token saliency from the vision encoder",
    "cls_attention": "the CLS token's attention row; this vision encoder has no CLS token",
    "text": "the prompt's text embeddings",
    "projected": "the projected visual tokens",
    "keys": "the vision encoder's attention keys",
    "grid": "the tokens' 2-D grid layout; these tokens form no known grid",
    "lm_attention": "attention read inside the language model",
    "release_saliency": "per-token saliency from the vision encoder (with the release's arithmetic where known)",
}

_REGISTRY: dict[str, type[TokenSelector]] = {}


def register(cls: type[TokenSelector]) -> type[TokenSelector]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise RuntimeError(f"method name {cls.name!r} is empty or registered twice")
    unknown = set(cls.requires) - REQUIREMENTS
    if unknown:
        raise RuntimeError(f"{cls.__name__} requires unknown inputs {sorted(unknown)}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def get_method(method: str | TokenSelector, **params) -> TokenSelector:
    """A method instance from its name (with parameters) or an instance passed through.

    ``params`` override the method's (or the preset's) fields; a name that is not one of
    its fields raises :class:`FlashVLMError` listing the fields (lmms-eval's ``model_args``
    arrive here too, so the message must say what is accepted).
    """
    if isinstance(method, TokenSelector):
        check_parameters(type(method), params)
        return dataclasses.replace(method, **params) if params else method
    if not isinstance(method, str):
        raise FlashVLMError(f"method must be a name or a TokenSelector; got {method!r}")
    name, _, preset = method.partition(":")
    if name not in _REGISTRY:
        raise FlashVLMError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
    cls = _REGISTRY[name]
    check_parameters(cls, params)
    if preset:
        return cls.preset(preset, **params)
    return cls(**params)


def check_parameters(cls: type[TokenSelector], params: dict) -> None:
    """Raise :class:`FlashVLMError` naming any of ``params`` that is not a field of ``cls``."""
    field_names = sorted(field.name for field in dataclasses.fields(cls) if field.init)
    unknown = sorted(set(params) - set(field_names))
    if unknown:
        accepted = f"its parameters are {field_names}" if field_names else "it takes no parameters"
        raise FlashVLMError(f"method {cls.name!r} has no parameter(s) {unknown}; {accepted}")


@dataclass
class TokenSelector:
    """Base of every selection method.

    Subclasses set ``name`` and ``requires`` and implement :meth:`select`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    #: True for the unpruned reference: every token is kept whatever the budget, and
    #: :meth:`select` is never called.
    keeps_all: ClassVar[bool] = False
    #: Named parameter sets, e.g. ``flashvlm:release``; see :meth:`preset`.
    presets: ClassVar[dict[str, dict]] = {}

    @classmethod
    def preset(cls, preset_name: str, **overrides) -> TokenSelector:
        if not cls.presets:
            raise FlashVLMError(f"method {cls.name!r} has no presets; got {preset_name!r}: name it alone, {cls.name!r}")
        if preset_name not in cls.presets:
            raise FlashVLMError(
                f"method {cls.name!r} has no preset {preset_name!r}; its presets: {', '.join(sorted(cls.presets))}"
            )
        return cls(**{**cls.presets[preset_name], **overrides})

    @property
    def lm_attention_layer(self) -> int | None:
        """For methods that require ``lm_attention``: read it in this language-model layer (1-based)."""
        return None

    def select(self, inputs: SelectionInputs, num_keep: int) -> Selection | torch.Tensor:
        """Choose ``num_keep`` (< N) tokens of each image. Return indices ``(B, K)`` or a Selection."""
        raise NotImplementedError

    def check_inputs(self, inputs: SelectionInputs) -> None:
        """Raise :class:`MethodUnavailableError` if a required input is missing."""
        available = {
            "saliency": inputs.saliency is not None,
            "cls_attention": inputs.saliency is not None and inputs.saliency_kind == "cls",
            "text": inputs.text_embeds is not None,
            "projected": inputs.projected is not None,
            "keys": inputs.keys is not None,
            "grid": inputs.grid_shape is not None,
            "lm_attention": inputs.lm_attention is not None,
            "release_saliency": inputs.saliency is not None,
        }
        missing = sorted(need for need in self.requires if not available[need])
        if missing:
            needs = "; ".join(f"{need} ({_REQUIREMENT_WORDS[need]})" for need in missing)
            raise MethodUnavailableError(f"method {self.name!r} needs {needs}, which this model does not provide")

    def __call__(self, inputs: SelectionInputs, budget: Budget) -> Selection:
        num_tokens = inputs.num_tokens
        num_keep = resolve_budget(budget, num_tokens)
        if self.keeps_all or num_keep >= num_tokens:
            indices = torch.arange(num_tokens, device=inputs.features.device)
            return Selection(indices.expand(inputs.batch_size, num_tokens))
        self.check_inputs(inputs)
        result = self.select(inputs, num_keep)
        selection = result if isinstance(result, Selection) else Selection(result)
        if selection.indices.shape != (inputs.batch_size, num_keep):
            raise RuntimeError(
                f"{type(self).__name__} returned indices of shape {tuple(selection.indices.shape)}, "
                f"expected {(inputs.batch_size, num_keep)}"
            )
        order = selection.indices.argsort(dim=-1, stable=True)
        selection.indices = selection.indices.gather(-1, order)
        if selection.features is not None:
            selection.features = selection.features.gather(
                1, order.unsqueeze(-1).expand(-1, -1, selection.features.shape[-1])
            )
        return selection


def requirements_for(requires: frozenset[str], saliency_kind: str) -> frozenset[str]:
    """A CLS-driven method's requirements for ``saliency_kind``: "cls" keeps ``cls_attention``;
    "any" asks for ``saliency`` of any kind instead (attention received where there is no CLS).

    Methods with a ``saliency_kind`` field assign the result to ``self.requires``: an instance
    attribute that shadows the class's, so adapters gather what this configuration needs.
    """
    if saliency_kind == "cls":
        return requires
    return (requires - {"cls_attention"}) | {"saliency"}


#: How a method wants its saliency computed (its ``saliency_arithmetic``): "float32" (the
#: adapters' own, from the hooked q/k in float32) or "release" (also ask for
#: ``release_saliency``: the arithmetic of the release, where the adapter knows it).
SALIENCY_ARITHMETICS = ("float32", "release")


def requirements_with_arithmetic(requires: frozenset[str], saliency_arithmetic: str) -> frozenset[str]:
    """``requires``, plus ``release_saliency`` for ``saliency_arithmetic="release"``.

    Methods with a ``saliency_arithmetic`` field assign the result to ``self.requires``
    (see :func:`requirements_for`).
    """
    check_choice("saliency_arithmetic", saliency_arithmetic, SALIENCY_ARITHMETICS)
    return requires | {"release_saliency"} if saliency_arithmetic == "release" else requires


def check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    """Raise :class:`FlashVLMError` unless ``value`` is a finite number in the interval."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (is_number and (value > low if low_open else value >= low) and value <= high):
        upper = "inf)" if high == math.inf else f"{high}]"
        raise FlashVLMError(f"{name} must be a number in {'(' if low_open else '['}{low}, {upper}; got {value!r}")


def check_integer(name: str, value: object, low: int) -> None:
    """Raise :class:`FlashVLMError` unless ``value`` is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FlashVLMError(f"{name} must be an integer >= {low}; got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`FlashVLMError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise FlashVLMError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
