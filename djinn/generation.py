"""HF `generate`'s arguments, turned into the plan of one Djinn generation (client side).

The preparation is HF's own: the model's `_prepare_generation_config` merges the
arguments over its `generation_config` and the global defaults, `_prepare_special_tokens`
settles eos and padding, `_prepare_attention_mask_for_generation` infers a mask from
padding when none is given, and `_prepare_generated_length` turns max/min new tokens
into lengths. These private methods have the same signatures in transformers 5.17 (the
GPU host) and 5.24 (PyPI today). Anything that would make HF decode differently from
the one loop Djinn runs (beams, several sequences per prompt, custom processors,
streamers, stop strings, ...) is refused by name instead of being ignored.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from djinn import models
from djinn.decoding import Padding
from djinn.errors import UnsupportedArgument
from djinn.sampling import SEED_BOUND, SamplingParams

# The generation-config fields Djinn honours; any other field must keep its default.
SUPPORTED_FIELDS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "return_dict_in_generate",
    "output_logits", "output_scores", "use_cache", "transformers_version"})


@dataclass(frozen=True)
class GenerationPlan:
    input_ids: torch.Tensor  # [batch, prompt], int64 on the CPU
    padding: Padding | None  # None: no padding (HF then drops the all-ones mask too)
    max_new_tokens: int
    sampling: SamplingParams
    eos: torch.Tensor | None  # ids that finish a row
    pad_token_id: int | None  # what a finished row is fed and padded with
    return_dict: bool
    output_logits: bool
    output_scores: bool
    context_limited: bool  # max_new_tokens was cut to the model's context


def plan(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
         generation_config: GenerationConfig | None, seed: int | None, generator: torch.Generator | None,
         kwargs: dict) -> GenerationPlan:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError("generate needs input_ids of shape [batch, tokens] (a tensor, both > 0)")
    input_ids = input_ids.cpu().long()
    has_default_max_length = (kwargs.get("max_length") is None and (
        generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None)
    has_default_min_length = (kwargs.get("min_length") is None and (
        generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    unsupported = sorted(set(model_kwargs) | _changed_unsupported_fields(config))
    if unsupported:
        raise UnsupportedArgument(f"generate() arguments Djinn does not support: {', '.join(unsupported)} "
                                  f"(supported: input_ids, attention_mask, generation_config, seed, generator, "
                                  f"return_logits, {', '.join(sorted(SUPPORTED_FIELDS - {'transformers_version'}))})")
    if not config.use_cache:
        raise UnsupportedArgument("generate(use_cache=False): Djinn always decodes from the KV cache")
    model._prepare_special_tokens(config, kwargs_has_attention_mask=attention_mask is not None, device="cpu")
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask {list(attention_mask.shape)} does not match input_ids "
                         f"{list(input_ids.shape)}")
    attention_mask = attention_mask.cpu().long()
    prompt = input_ids.shape[1]
    config = model._prepare_generated_length(
        generation_config=config, has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length, model_input_name="input_ids", input_ids_length=prompt,
        inputs_tensor=input_ids)
    if prompt >= config.max_length:
        raise ValueError(f"the prompt has {prompt} tokens and max_length is {config.max_length}: "
                         f"set max_new_tokens")
    context = models.max_positions(model.config)
    if prompt >= context:
        raise ValueError(f"the prompt's {prompt} tokens fill the model's context of {context}: nothing to generate")
    max_new = config.max_length - prompt
    limited = prompt + max_new > context
    if limited:
        warnings.warn(f"{prompt} prompt + {max_new} new tokens exceed the model's context of {context}: "
                      f"generation stops at the context ({context - prompt} new tokens)", stacklevel=3)
        max_new = context - prompt
    eos = config._eos_token_tensor
    pad = config._pad_token_tensor
    return GenerationPlan(
        input_ids=input_ids, padding=None if bool(attention_mask.all()) else Padding.of_prompt(attention_mask),
        max_new_tokens=max_new, sampling=SamplingParams.of(config, _seed(config, seed, generator)),
        eos=None if eos is None else eos.reshape(-1).cpu(), pad_token_id=None if pad is None else int(pad),
        return_dict=bool(config.return_dict_in_generate), output_logits=bool(config.output_logits),
        output_scores=bool(config.output_scores), context_limited=limited)


def _changed_unsupported_fields(config: GenerationConfig) -> set[str]:
    defaults = GenerationConfig().to_dict()
    defaults.update(config._get_default_generation_params())
    # None, False and 0 all mean "off" (HF's defaults moved from one to another across releases).
    return {name for name, value in config.to_dict().items()
            if name not in SUPPORTED_FIELDS and not name.startswith("_") and value != defaults.get(name)
            and (value or defaults.get(name))}


def _seed(config: GenerationConfig, seed: int | None, generator: torch.Generator | None) -> int | None:
    """The seed of a sampled generation: given, drawn from `generator`, or from torch's global generator.

    Every mode then seeds a fresh generator on the device that samples, so a seed means
    the same draws in every mode (and, from torch.manual_seed(seed), the draws HF makes).
    """
    if not config.do_sample:
        return None
    if seed is not None and generator is not None:
        raise ValueError("pass a seed or a generator, not both")
    if seed is not None:
        if not 0 <= seed <= SEED_BOUND:
            raise ValueError(f"seed must be in [0, {SEED_BOUND}]")
        return int(seed)
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(SEED_BOUND, (), generator=generator, device=device))
