"""Picking the next token as HF's `generate` does, on whichever side holds the logits.

`SamplingParams` are the options a generation samples with; they cross the wire once,
with a session's prefill. `Sampler` applies HF's own logits processors, built by the
model's `_get_logits_processor` exactly as `generate` builds them (so their order and
each release's details, e.g. 5.24's repetition penalty skipping left padding, follow
the installed transformers), then takes the argmax or one `torch.multinomial` draw
per step for the whole batch from a seeded `torch.Generator` on the logits' device.
HF's `_sample` draws the same way from torch's global generator, so a seed `s` here
gives HF's tokens after `torch.manual_seed(s)` on the same device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList

from djinn.errors import BadRequest

SEED_BOUND = 2**63 - 1  # a seed fits msgpack's int64 and `torch.Generator.manual_seed`


@dataclass(frozen=True)
class SamplingParams:
    """The fields of a merged HF `GenerationConfig` that shape the next-token pick (None: HF's default)."""
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None  # of the draws; set exactly when do_sample

    @classmethod
    def of(cls, config: GenerationConfig, seed: int | None) -> "SamplingParams":
        eos = config.eos_token_id
        eos = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        return cls(bool(config.do_sample), config.temperature, config.top_k, config.top_p, config.repetition_penalty,
                   config.min_length, config.min_new_tokens, eos, config.pad_token_id,
                   seed if config.do_sample else None)

    def as_wire(self) -> dict:
        return {**dataclasses.asdict(self), "eos_token_id": list(self.eos_token_id)}

    @classmethod
    def from_wire(cls, values: object) -> "SamplingParams":
        """Checked field by field: a raw client must not reach HF's processors with odd types."""
        if not isinstance(values, dict):
            raise BadRequest("'sampling' must be a map of sampling options")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise BadRequest(f"unknown sampling options {unknown}; known: {sorted(fields)}")
        checked = {}
        for name, value in values.items():
            if name == "do_sample":
                ok = isinstance(value, bool)
            elif name == "eos_token_id":
                ok = isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)
                value = tuple(value) if ok else value
            elif name in ("temperature", "repetition_penalty"):
                ok = value is None or (_is_number(value) and value > 0)
            elif name == "top_p":
                ok = value is None or (_is_number(value) and 0 < value <= 1)
            elif name == "seed":
                ok = value is None or (_is_int(value) and 0 <= value <= SEED_BOUND)
            else:
                ok = value is None or (_is_int(value) and value >= 0)
            if not ok:
                raise BadRequest(f"sampling option {name!r} has an invalid value {value!r}")
            checked[name] = value
        params = cls(**checked)
        if params.do_sample and params.seed is None:
            raise BadRequest("sampling ('do_sample') needs a 'seed'")
        try:
            params.generation_config().validate()
        except ValueError as exc:
            raise BadRequest(f"sampling options rejected by transformers: {exc}") from None
        return params

    def generation_config(self) -> GenerationConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seed"}
        values["eos_token_id"] = list(self.eos_token_id) or None
        config = GenerationConfig(**values)
        # What `_prepare_generation_config` fills in for fields nobody set (top_k 50, ...).
        config.update(**config._get_default_generation_params(), defaults_only=True)
        return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Sampler:
    """One generation's next-token pick: HF's processors, then argmax or a seeded draw.

    The processors read every token fed so far (repetition penalty, minimum lengths), so
    the sampler keeps that history when it has any processor; it grows by what each step
    feeds, which is what HF's `input_ids` holds (finished rows fed their padding).
    """

    def __init__(self, processors, generator: torch.Generator | None, history: torch.Tensor | None):
        self.processors = processors
        self.generator = generator
        self.history = history

    @classmethod
    def greedy(cls) -> "Sampler":
        """The argmax of the raw logits: a session driven step by step (breakpoints) picks so."""
        return cls(LogitsProcessorList(), None, None)

    @classmethod
    def build(cls, model: torch.nn.Module, params: SamplingParams, prompt: torch.Tensor,
              mask: torch.Tensor | None, device: torch.device) -> "Sampler":
        """The sampler of a generation whose prompt is `prompt` ([batch, tokens]; `mask` only when padded)."""
        config = params.generation_config()
        # generate's own preparation (transformers 5.17 and 5.24 alike): eos/pad tensors,
        # then the processor list in its order for this config.
        model._prepare_special_tokens(config, kwargs_has_attention_mask=mask is not None, device=device)
        prompt = prompt.to(device)
        processors = model._get_logits_processor(
            config, input_ids_seq_length=prompt.shape[1], encoder_input_ids=prompt, device=device,
            model_kwargs={"attention_mask": None if mask is None else mask.to(device)})
        generator = (torch.Generator(device=device).manual_seed(params.seed) if params.do_sample else None)
        return cls(processors, generator, prompt[:, :0] if len(processors) else None)

    def state(self) -> tuple:
        """What picks change (the history, the generator's state), for `restore` after a rolled-back step."""
        return self.history, self.generator.get_state() if self.generator is not None else None

    def restore(self, state: tuple) -> None:
        self.history, generator_state = state
        if generator_state is not None:
            self.generator.set_state(generator_state)

    def pick(self, fed: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next token [batch, 1], processed scores [batch, vocab]) for the logits that followed `fed`."""
        # HF processes a float32 copy of the step's logits, as processors may write in place.
        scores = logits.to(dtype=torch.float32, copy=self.history is not None)
        if self.history is not None:
            if fed is None:
                raise BadRequest("this session's sampling reads every token fed, and this step's are unknown")
            history = torch.cat([self.history, fed.to(self.history.device, torch.long)], dim=1)
            scores = self.processors(history, scores)
            self.history = history
        if self.generator is None:
            return scores.argmax(dim=-1, keepdim=True), scores
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator), scores
