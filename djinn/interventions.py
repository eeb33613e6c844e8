"""Declarative white-box interventions: what to read or edit, where, and in which steps.

An `Intervention` is data, never code: an op (`save`, `scale`, `add`, `replace`, `ablate`)
at a site (`embeddings`, a decoder layer's `attention` or `mlp` output or its `layer`
output, the `final_norm`), addressed by site name and layer index, with the tensor it
needs (an `add`'s vector, a `replace`'s tensor: sent once per request, whatever the
steps). The server runs them as forward hooks on the unmodified HF modules
(`djinn.server.interventions`); the client builds them with the functions below
(`save("layer", 5)`, `add("layer", 3, vector)`, ...). On the wire each is a map in the
request's `interventions` argument and its tensor a frame named `intervention.<index>`:
no pickle, nothing executable.

Rules a user can rely on:
- several interventions may share a pass; at one site they run in the order given,
  so a `save` listed after an edit sees the edited value;
- `positions` select token positions of the step (negative from its end); an edit
  leaves the other positions alone, a save keeps only those;
- `steps` select the steps of a `generate` (0: the forward over the fed ids, k: the k-th
  decode step after it); None: every step;
- a save of several steps comes back once, its steps concatenated along the positions
  (or one tensor per step with `per_step`); a `lens` save comes back as the final norm
  and the unembedding applied to the saved value (the logit lens), not the value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from djinn.errors import BadRequest, quote

SITES = ("embeddings", "attention", "mlp", "layer", "final_norm")
LAYER_SITES = ("attention", "mlp", "layer")  # addressed by a decoder layer's index; the others by name alone
OPS = ("save", "scale", "add", "replace", "ablate")
ABLATIONS = ("zero", "mean")  # mean: each row's mean over the step's (selected) positions, or a given mean
TENSOR_OPS = ("add", "replace")  # need a tensor; `ablate` takes one optionally (the mean to ablate to)
TENSOR_PREFIX = "intervention."
# Bounds a request's header can name: as many interventions as a 70B model has sites and
# more; positions and steps as long as a context.
MAX_INTERVENTIONS = 1024
MAX_INDICES = 1 << 17
MAX_NAME_CHARS = 128


@dataclass(frozen=True, eq=False)
class Intervention:
    op: str
    site: str
    layer: int | None = None  # a decoder layer's index for LAYER_SITES; None for the others
    positions: tuple[int, ...] | None = None  # token positions of the step; None: all of them
    steps: tuple[int, ...] | None = None  # steps of a generate; None: every step
    factor: float | None = None  # scale
    tensor: torch.Tensor | None = None  # add, replace; ablate "mean" with a given mean
    ablation: str = "zero"  # ablate
    lens: bool = False  # save: the logit lens of the saved value instead of the value
    name: str | None = None  # save: the key of its result (default `key`)

    @property
    def key(self) -> str:
        """Where a save's result comes back: its name, else `[lens.]site[.layer]`."""
        if self.name is not None:
            return self.name
        where = self.site if self.layer is None else f"{self.site}.{self.layer}"
        return f"lens.{where}" if self.lens else where

    @property
    def where(self) -> str:
        return self.site if self.layer is None else f"{self.site} of decoder layer {self.layer}"

    def applies_at(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def as_wire(self) -> dict:
        """The header form; the tensor travels as its own frame."""
        fields = {"op": self.op, "site": self.site, "layer": self.layer, "positions": _listed(self.positions),
                  "steps": _listed(self.steps), "factor": self.factor, "lens": self.lens, "name": self.name,
                  "tensor": self.tensor is not None}
        if self.op == "ablate":
            fields["ablation"] = self.ablation
        return {k: v for k, v in fields.items() if v is not None and v is not False}

    @classmethod
    def from_wire(cls, raw: object, tensor: torch.Tensor | None, what: str) -> "Intervention":
        """One parsed from a header map; `BadRequest` naming `what` and the field for anything else."""
        if not isinstance(raw, Mapping):
            raise BadRequest(f"{what} must be a map of op, site, layer, ..., got {quote(raw)}")
        unknown = set(raw) - {"op", "site", "layer", "positions", "steps", "factor", "ablation", "lens", "name",
                              "tensor"}
        if unknown:
            raise BadRequest(f"{what} has unknown fields {sorted(map(str, unknown))}")
        if bool(raw.get("tensor")) != (tensor is not None):
            raise BadRequest(f"{what} declares {'a' if raw.get('tensor') else 'no'} tensor, the message carries "
                             f"{'one' if tensor is not None else 'none'}")
        positions, steps = raw.get("positions"), raw.get("steps")
        parsed = cls(raw.get("op"), raw.get("site"), raw.get("layer"),
                     tuple(positions) if isinstance(positions, list) else positions,
                     tuple(steps) if isinstance(steps, list) else steps,
                     raw.get("factor"), tensor, raw.get("ablation", "zero"), raw.get("lens", False), raw.get("name"))
        check(parsed, what)
        return parsed


def _listed(values: tuple[int, ...] | None) -> list[int] | None:
    return None if values is None else list(values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _indices(values: object, what: str, field: str, non_negative: bool) -> None:
    if values is None:
        return
    if (not isinstance(values, tuple) or not values or len(values) > MAX_INDICES
            or not all(_is_int(v) and abs(v) < MAX_INDICES for v in values)):
        raise BadRequest(f"{what}: '{field}' must be a non-empty list of at most {MAX_INDICES} ints, got "
                         f"{quote(values)}")
    if non_negative and min(values) < 0:
        raise BadRequest(f"{what}: '{field}' must hold step numbers from 0, got {min(values)}")
    if len(set(values)) != len(values):
        raise BadRequest(f"{what}: '{field}' names an index twice: {quote(values)}")


def check(iv: Intervention, what: str) -> None:
    """Everything that can be checked without the model; `BadRequest` naming the field."""
    if iv.op not in OPS:
        raise BadRequest(f"{what}: unknown op {quote(iv.op)}; known: {', '.join(OPS)}")
    if iv.site not in SITES:
        raise BadRequest(f"{what}: unknown site {quote(iv.site)}; known: {', '.join(SITES)}")
    what = f"{what} ({iv.op} at {iv.site})"
    if iv.site in LAYER_SITES:
        if not _is_int(iv.layer):
            raise BadRequest(f"{what}: site {iv.site} needs a decoder layer index, got {quote(iv.layer)}")
    elif iv.layer is not None:
        raise BadRequest(f"{what}: site {iv.site} has no layer index, got {quote(iv.layer)}")
    _indices(iv.positions, what, "positions", non_negative=False)
    _indices(iv.steps, what, "steps", non_negative=True)
    if iv.op == "scale":
        if isinstance(iv.factor, bool) or not isinstance(iv.factor, (int, float)) or not math.isfinite(iv.factor):
            raise BadRequest(f"{what}: 'factor' must be a finite number, got {quote(iv.factor)}")
    elif iv.factor is not None:
        raise BadRequest(f"{what}: only scale takes a 'factor'")
    if iv.op == "ablate":
        if iv.ablation not in ABLATIONS:
            raise BadRequest(f"{what}: 'ablation' must be one of {list(ABLATIONS)}, got {quote(iv.ablation)}")
        if iv.ablation == "zero" and iv.tensor is not None:
            raise BadRequest(f"{what}: a zero ablation takes no tensor")
    elif iv.ablation != "zero":
        raise BadRequest(f"{what}: only ablate takes an 'ablation'")
    if iv.op in TENSOR_OPS and iv.tensor is None:
        raise BadRequest(f"{what}: {iv.op} needs a tensor")
    if iv.op in ("save", "scale") and iv.tensor is not None:
        raise BadRequest(f"{what}: {iv.op} takes no tensor")
    if iv.tensor is not None and (not isinstance(iv.tensor, torch.Tensor) or not iv.tensor.is_floating_point()):
        raise BadRequest(f"{what}: the tensor must be a floating tensor, got "
                         f"{getattr(iv.tensor, 'dtype', type(iv.tensor).__name__)}")
    if not isinstance(iv.lens, bool) or (iv.lens and iv.op != "save"):
        raise BadRequest(f"{what}: 'lens' is a flag of save")
    if iv.name is not None and (iv.op != "save" or not isinstance(iv.name, str)
                                or not 0 < len(iv.name) <= MAX_NAME_CHARS):
        raise BadRequest(f"{what}: 'name' is a save's key, a string of 1 to {MAX_NAME_CHARS} characters, "
                         f"got {quote(iv.name)}")


def check_keys(interventions: Sequence[Intervention]) -> None:
    """Two saves with one key would overwrite each other's result."""
    keys = [iv.key for iv in interventions if iv.op == "save"]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise BadRequest(f"several saves come back under {twice}: give them distinct names")


# -- building them (client side) ----------------------------------------------------------------
def _tuple(values: Sequence[int] | int | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    return (values,) if isinstance(values, int) else tuple(values)


def save(site: str, layer: int | None = None, *, positions=None, steps=None, lens: bool = False,
         name: str | None = None) -> Intervention:
    """Read the site's output (at `positions`); with `lens`, its logit lens instead."""
    return Intervention("save", site, layer, _tuple(positions), _tuple(steps), lens=lens, name=name)


def scale(site: str, layer: int | None, factor: float, *, positions=None, steps=None) -> Intervention:
    return Intervention("scale", site, layer, _tuple(positions), _tuple(steps), factor=factor)


def add(site: str, layer: int | None, vector: torch.Tensor, *, positions=None, steps=None) -> Intervention:
    """Add `vector` (broadcast over the batch and the positions: a steering vector is [hidden])."""
    return Intervention("add", site, layer, _tuple(positions), _tuple(steps), tensor=vector)


def replace(site: str, layer: int | None, tensor: torch.Tensor, *, positions=None, steps=None) -> Intervention:
    """Replace the site's output (at `positions`) by `tensor`, broadcast to [batch, positions, hidden]."""
    return Intervention("replace", site, layer, _tuple(positions), _tuple(steps), tensor=tensor)


def ablate(site: str, layer: int | None = None, how: str = "zero", *, mean: torch.Tensor | None = None,
           positions=None, steps=None) -> Intervention:
    """Zero the site's output, or set it to a mean: `mean` when given (e.g. over a data set), else each
    row's mean over the step's selected positions."""
    return Intervention("ablate", site, layer, _tuple(positions), _tuple(steps), tensor=mean, ablation=how)


def check_all(interventions: Sequence[Intervention]) -> None:
    """The checks a server makes of a request's interventions before it looks at the model."""
    for index, iv in enumerate(interventions):
        check(iv, f"intervention {index}")
    check_keys(interventions)


def to_wire(interventions: Sequence[Intervention]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The request's `interventions` argument and the tensors that go with it."""
    check_all(interventions)
    tensors = {f"{TENSOR_PREFIX}{i}": iv.tensor for i, iv in enumerate(interventions) if iv.tensor is not None}
    return [iv.as_wire() for iv in interventions], tensors


def from_wire(raw: object, tensors: Mapping[str, Any]) -> tuple[Intervention, ...]:
    """A request's interventions, each checked; `BadRequest` naming the one that is wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_INTERVENTIONS:
        raise BadRequest(f"'interventions' must be a list of at most {MAX_INTERVENTIONS} maps")
    parsed = tuple(Intervention.from_wire(entry, tensors.get(f"{TENSOR_PREFIX}{i}"), f"intervention {i}")
                   for i, entry in enumerate(raw))
    check_keys(parsed)
    return parsed
