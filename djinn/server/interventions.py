"""Interventions on the server: forward hooks on the HF modules, installed for one step, always removed.

An `InterventionRun` is one request's interventions (`djinn.interventions`), checked against
the model before anything runs: the layer in range, the site's module found, steps within
the request's. `run.at(step).installed(batch, tokens)` installs the hooks of the
interventions that apply at that step (positions and tensor shapes checked against the
step's batch and tokens first) and removes them on exit, error or not; saves of an attempt
that failed (a forward retried after an allocation failure) are dropped with it. After the
last step `results()` gives each save once, its steps concatenated along the positions (or
step by step), a `lens` save as the final norm and the unembedding of the saved value,
computed with every hook removed.

Hooks over forks of model code: the model is the unmodified HF module tree, so the same
hooks reach a streamed model's layers (the ring's own hooks only swap parameters) and a
parked forward's worker thread. A run belongs to one request of one session and installs
per step, so a batched step could later give each row its own edits.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from djinn.errors import BadRequest, quote
from djinn.interventions import LAYER_SITES, Intervention, from_wire
from djinn.server.streamer import find_decoder_layers
from djinn.transport import Codec, Message

# Submodule names of the sites across HF decoders (Llama/Mistral/Qwen/Gemma, GPT-2, Falcon, ...).
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
LOGITS_CHOICES = ("last", "all", "none")  # none: a forward whose saves are all it returns
SAVED_PREFIX = "saved."


def _child(parent: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    raise BadRequest(f"{what}: {type(parent).__name__} has no such module (looked for {', '.join(names)})")


def site_module(model: nn.Module, iv: Intervention, what: str) -> nn.Module:
    """The module whose output is the intervention's site."""
    if iv.site == "embeddings":
        return model.get_input_embeddings()
    if iv.site == "final_norm":
        return _child(model.base_model, FINAL_NORM_NAMES, f"{what}: the final norm")
    stack = find_decoder_layers(model)
    if not 0 <= iv.layer < len(stack):
        raise BadRequest(f"{what}: decoder layer {iv.layer} is outside 0..{len(stack) - 1}: the model has "
                         f"{len(stack)} decoder layers")
    block = stack[iv.layer]
    if iv.site == "layer":
        return block
    return _child(block, ATTENTION_NAMES if iv.site == "attention" else MLP_NAMES,
                  f"{what}: the {iv.site} of decoder layer {iv.layer}")


@dataclass(frozen=True)
class TraceOptions:
    """What a traced request returns beside its saves: the last position's logits, every position's or
    none, the codec of the saved activations, each step's saves apart or concatenated."""
    logits: str = "last"
    saves_codec: Codec = Codec.RAW
    per_step: bool = False

    @property
    def all_logits(self) -> bool:
        return self.logits == "all"

    @classmethod
    def parse(cls, message: Message) -> "TraceOptions":
        logits = message.args.get("logits", "last")
        if logits not in LOGITS_CHOICES:
            raise BadRequest(f"'logits' must be one of {list(LOGITS_CHOICES)}, got {quote(logits)}")
        codec = message.args.get("saves_codec", Codec.RAW.value)
        if not isinstance(codec, str) or codec not in Codec._value2member_map_:
            raise BadRequest(f"unknown saves codec {quote(codec)}; known: {', '.join(c.value for c in Codec)}")
        per_step = message.args.get("per_step", False)
        if not isinstance(per_step, bool):
            raise BadRequest(f"'per_step' must be true or false, got {quote(per_step)}")
        return cls(logits, Codec(codec), per_step)


class InterventionRun:
    """One request's interventions over its `steps` steps, on `model` (whose device and dtype they take)."""

    def __init__(self, model: nn.Module, interventions: Sequence[Intervention], steps: int,
                 device: torch.device):
        self.model = model
        self.device = device
        self.interventions = tuple(interventions)
        self.steps = steps
        self._modules: list[nn.Module] = []
        dtype = next(model.parameters()).dtype
        self._tensors: dict[int, torch.Tensor] = {}
        self.hidden = model.config.hidden_size
        for index, iv in enumerate(self.interventions):
            what = self.describe(index)
            self._modules.append(site_module(model, iv, what))
            if iv.steps is not None and max(iv.steps) >= steps:
                raise BadRequest(f"{what}: applies at steps {list(iv.steps)}, this request runs "
                                 f"{steps} step{'s' if steps > 1 else ''} (0..{steps - 1})")
            if iv.lens:
                _child(model.base_model, FINAL_NORM_NAMES, f"{what}: the logit lens needs the final norm")
                if model.get_output_embeddings() is None:
                    raise BadRequest(f"{what}: the logit lens needs the model's unembedding (lm_head)")
            if iv.tensor is not None:
                tensor = iv.tensor
                if tensor.dim() == 0 or tensor.shape[-1] != self.hidden:
                    raise BadRequest(f"{what}: its tensor {list(tensor.shape)} must end in the hidden size "
                                     f"{self.hidden} of the {iv.site}")
                # Sent once per request, uploaded once, in the site's dtype.
                self._tensors[index] = tensor.to(device=device, dtype=dtype)
        self._saved: dict[str, list[tuple[int, torch.Tensor]]] = {iv.key: [] for iv in self.interventions
                                                                   if iv.op == "save"}

    @classmethod
    def parse(cls, model: nn.Module, message: Message, steps: int, device: torch.device) -> "InterventionRun | None":
        parsed = from_wire(message.args.get("interventions"), message.tensors)
        return cls(model, parsed, steps, device) if parsed else None

    def describe(self, index: int) -> str:
        iv = self.interventions[index]
        return f"intervention {index} ({iv.op} at the {iv.where})"

    def check_layers(self, allowed, why: str) -> None:
        """Refuse interventions whose site `allowed(iv)` rejects (a breakpoint's half of the forward)."""
        for index, iv in enumerate(self.interventions):
            if not allowed(iv):
                raise BadRequest(f"{self.describe(index)}: {why}")

    def at(self, step: int) -> "StepHooks":
        return StepHooks(self, step)

    # -- results ---------------------------------------------------------------------------
    @torch.no_grad()
    def results(self, per_step: bool = False) -> dict[str, torch.Tensor]:
        """Each save's result by wire name: `saved.<key>` (its steps concatenated along the positions)
        or `saved.<step>.<key>` (per step). Call with no hooks installed: a lens runs the final norm."""
        lens_keys = {iv.key for iv in self.interventions if iv.op == "save" and iv.lens}
        out = {}
        for key, parts in self._saved.items():
            if not parts:
                continue
            pieces = [(f"{SAVED_PREFIX}{step}.{key}", value) for step, value in parts] if per_step else \
                [(f"{SAVED_PREFIX}{key}", torch.cat([value for _, value in parts], dim=1))]
            for name, value in pieces:
                out[name] = self._lens(value) if key in lens_keys else value
        return out

    def _lens(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = _child(self.model.base_model, FINAL_NORM_NAMES, "the logit lens")
        return self.model.get_output_embeddings()(norm(hidden))

    # -- one step's hooks ------------------------------------------------------------------
    def _edit(self, index: int, hidden: torch.Tensor, step: int, current: dict, selected) -> torch.Tensor:
        """`selected`: the positions as a slice or a device index tensor (`_selection`), None for all."""
        iv = self.interventions[index]
        part = hidden if selected is None else hidden[:, selected]
        if iv.op == "save":
            # An index tensor's selection is a copy already; the whole output or a slice is a view.
            kept = part if isinstance(selected, torch.Tensor) else part.detach().clone()
            current.setdefault(iv.key, []).append((step, kept))
            return hidden
        if iv.op == "scale":
            edited = part * iv.factor
        elif iv.op == "add":
            edited = part + self._tensors[index]
        elif iv.op == "replace" or index in self._tensors:  # replace, or ablate to a given mean
            edited = torch.broadcast_to(self._tensors[index], part.shape).contiguous()
        elif iv.ablation == "zero":
            edited = torch.zeros_like(part)
        else:
            edited = part.mean(dim=1, keepdim=True).expand_as(part).contiguous()
        if selected is None:
            return edited
        out = hidden.clone()
        out[:, selected] = edited
        return out

    def _check_step(self, index: int, step: int, batch: int, tokens: int) -> None:
        iv = self.interventions[index]
        what = self.describe(index)
        if iv.positions is not None:
            outside = [p for p in iv.positions if not -tokens <= p < tokens]
            if outside:
                raise BadRequest(f"{what}: position {outside[0]} is outside step {step}'s {tokens} "
                                 f"token{'s' if tokens > 1 else ''}")
        tensor = self._tensors.get(index)
        if tensor is not None:
            target = (batch, tokens if iv.positions is None else len(iv.positions), self.hidden)
            try:
                fits = torch.broadcast_shapes(tensor.shape, target) == target
            except RuntimeError:
                fits = False
            if not fits:
                raise BadRequest(f"{what}: its tensor {list(tensor.shape)} does not broadcast to the site's "
                                 f"[batch, positions, hidden] = {list(target)} at step {step}")

    def _selection(self, index: int, tokens: int, device: torch.device):
        """An intervention's positions in a step of `tokens` tokens: a slice when they are a run (a view,
        no index tensor), else an index tensor made on the device before the forward starts (made
        inside a hook, its host-to-device copy would stall the forward's launches at every layer)."""
        positions = self.interventions[index].positions
        if positions is None:
            return None
        wrapped = [p % tokens for p in positions]
        if wrapped == list(range(wrapped[0], wrapped[0] + len(wrapped))):
            return slice(wrapped[0], wrapped[0] + len(wrapped))
        return torch.tensor(wrapped, device=device)

    def _hook(self, indices: list[int], selections: list, step: int, current: dict):
        def hook(module: nn.Module, args, output):
            is_tensor = isinstance(output, torch.Tensor)
            hidden = output if is_tensor else output[0]
            if hidden.dim() != 3:
                raise BadRequest(f"{self.describe(indices[0])}: the site's output is {list(hidden.shape)}, "
                                 f"not [batch, tokens, hidden]")
            edited = hidden
            for index, selected in zip(indices, selections):
                edited = self._edit(index, edited, step, current, selected)
            if edited is hidden:
                return None
            return edited if is_tensor else (edited, *output[1:])
        return hook


@dataclass(frozen=True)
class StepHooks:
    """The hooks of one step of a run."""
    run: InterventionRun
    step: int

    @contextmanager
    def installed(self, batch: int, tokens: int) -> Iterator[None]:
        run = self.run
        by_module: dict[int, tuple[nn.Module, list[int], list]] = {}
        for index, iv in enumerate(run.interventions):
            if iv.applies_at(self.step):
                run._check_step(index, self.step, batch, tokens)
                module = run._modules[index]
                _, indices, selections = by_module.setdefault(id(module), (module, [], []))
                indices.append(index)
                selections.append(run._selection(index, tokens, run.device))
        current: dict[str, list] = {}
        # One hook per module, its interventions in the order given; modules in the order first named.
        handles = [module.register_forward_hook(run._hook(indices, selections, self.step, current))
                   for module, indices, selections in by_module.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for key, parts in current.items():  # only an attempt that finished keeps its saves
            run._saved[key].extend(parts)


def before_breakpoint(layer: int):
    """Sites a forward parked after decoder layer `layer` has already run."""
    return lambda iv: iv.site == "embeddings" or (iv.site in LAYER_SITES and iv.layer <= layer)
