"""What a served model can do, read from its recipe (no Ray, no FastAPI here).

An :class:`Operation` maps a route (``POST /v1/models/{name}/<route>``) to a
recipe's optional function (``Recipe.log_prob``, ``.sample``, ``.encode``,
``.decode``, ``.classify``, ``.purify``). A model offers exactly the operations whose function its
recipe defines. A function may return a dict of Tensors: ``result`` names the primary one (PNG output
and pooling use it) and every other key is returned beside it. A later family adds a row here and a
four-line route in :mod:`serve.app`; nothing else changes.

Request options are the function's keyword-only parameters with scalar
defaults (``dt``, ``rounds``, ``sampler``, ``estimator`` for diffusion;
``temperature`` for flows ...), read with :mod:`inspect`. Their type comes from
the default, bounds and choices from the family's ``Recipe.options`` (see
:func:`option_specs`). Functions that take
a ``generator`` are random: requests may give ``seed`` to make them
reproducible. A recipe's ``cost(cfg, op, **options)`` (e.g. ``{"nfe": 10}``)
is returned next to the result.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

#: parameters that are never request options
RESERVED = {"model", "x", "z", "n", "cfg", "generator", "seed"}
SEED_MAX = 2 ** 63 - 1


class InputError(ValueError):
    """A request is invalid: HTTP ``status`` with the ``field`` at fault and what is allowed."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def as_dict(self) -> dict:
        return {"field": self.field, "message": f"{self.field}: {self.message}"}


@dataclass(frozen=True)
class Operation:
    route: str          # URL segment
    attr: str           # recipe attribute
    takes: str          # "data" (x: examples in data space), "latent" (z), "count" (n)
    pooled: bool        # eligible for @serve.batch pooling (concatenate requests with equal options)
    result: str         # JSON key of the per-example result
    summary: str
    data_out: bool = False  # the result lives in data space (``format: png`` possible for images)


OPERATIONS: dict[str, Operation] = {op.route: op for op in (
    Operation("log-likelihood", "log_prob", "data", True, "log_prob",
              "log p(x) per example (nats unless the model says otherwise)"),
    Operation("sample", "sample", "count", False, "samples", "n samples in data space", data_out=True),
    Operation("encode", "encode", "data", True, "z", "latent codes z of x"),
    Operation("decode", "decode", "latent", False, "x", "data-space reconstructions of latents z",
              data_out=True),
    Operation("classify", "classify", "data", True, "label", "predicted class and class probabilities of x"),
    Operation("purify", "purify", "data", True, "x", "test-time purification of x (e.g. Eq. 22 ELBO ascent): "
              "purified x, prediction, ELBO before / after", data_out=True),
    Operation("counterfactual", "counterfactual", "data", False, "x",
              "counterfactuals of image pairs (x[2i], x[2i+1]) (DiffSiam Alg. 2): out[2i] takes x[2i+1]'s "
              "chosen segments, out[2i+1] the reverse", data_out=True),
)}


def recipe_function(recipe, op: Operation) -> Optional[Callable]:
    """The recipe's function for ``op`` (a :class:`~raymanifold.recipes.Recipe` field), or None."""
    return getattr(recipe, op.attr)


def is_random(fn: Callable) -> bool:
    return "generator" in inspect.signature(fn).parameters


def _scalar_type(param: inspect.Parameter) -> Optional[tuple[str, bool]]:
    """(type name, nullable) of an option, or None if it is not a scalar option."""
    d = param.default
    if isinstance(d, bool):
        return "bool", False
    if isinstance(d, int):
        return "int", False
    if isinstance(d, float):
        return "float", False
    if isinstance(d, str):
        return "str", False
    if d is None:
        ann = str(param.annotation).replace("typing.", "").replace(" ", "")
        for t in ("str", "int", "float", "bool"):
            if ann in (f"Optional[{t}]", f"{t}|None", f"None|{t}"):
                return t, True
    return None


#: server-level budgets of options (not a family's business): ``rounds`` of a request in 1..max_rounds
SERVER_BUDGETS = ("rounds",)


def option_specs(recipe, fn: Callable, cfg, *, max_rounds: int) -> dict[str, dict]:
    """JSON-able schema of ``fn``'s options: {name: {type, default, nullable, min, max, choices}}.

    Types and defaults come from ``fn``'s keyword-only parameters, bounds and choices from the family's
    ``recipe.options(cfg)`` (:meth:`raymanifold.recipes.Recipe.options_of`). The server adds its own budget:
    ``rounds`` lies in 1..max_rounds (intersected with the family's bounds). The recipe still checks
    everything itself (a ValueError becomes a 422).
    """
    declared = recipe.options_of(cfg)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in RESERVED:
            continue
        st = _scalar_type(p)
        if st is None:
            continue
        typ, nullable = st
        spec: dict[str, Any] = {"type": typ, "default": p.default, "nullable": nullable}
        want = dict(declared.get(p.name, {}))
        if p.name in SERVER_BUDGETS:
            lo, hi = want.get("min"), want.get("max")
            want["min"] = 1 if lo is None else max(lo, 1)
            want["max"] = max_rounds if hi is None else min(hi, max_rounds)
        if typ in ("int", "float") and ("min" in want or "max" in want):
            spec["min"], spec["max"] = want.get("min"), want.get("max")
        if typ == "str" and "choices" in want:
            spec["choices"] = list(want["choices"])
        out[p.name] = spec
    return out


def _coerce_form(name: str, raw: str, typ: str):
    """Form fields arrive as text: convert to the option's type."""
    try:
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
        if typ == "bool":
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError
    except ValueError:
        raise InputError(422, name, f"expected {typ}, got {raw!r}") from None
    return raw


def check_option(name: str, value, spec: dict, *, from_form: bool = False):
    """Validate one option value against its spec; return the (converted) value."""
    typ = spec["type"]
    if value is None:
        if spec.get("nullable"):
            return None
        raise InputError(422, name, f"must be a {typ}, not null")
    if from_form and isinstance(value, str):
        value = _coerce_form(name, value, typ)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}[typ]
    if not ok:
        raise InputError(422, name, f"expected {typ}, got {type(value).__name__} {value!r}"[:200])
    if typ == "float":
        value = float(value)
        if not math.isfinite(value):
            raise InputError(422, name, f"must be finite, got {value}")
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InputError(422, name, f"must be in {rng}, got {value}")
    if "choices" in spec and value not in spec["choices"]:
        raise InputError(422, name, f"unknown value {value!r}; allowed: {spec['choices']}")
    return value


def check_seed(value, *, from_form: bool = False) -> Optional[int]:
    return check_option("seed", value, {"type": "int", "nullable": True, "min": 0, "max": SEED_MAX},
                        from_form=from_form)


def check_options(given: dict, specs: dict, *, fixed: tuple[str, ...], from_form: bool = False) -> dict:
    """Validate request fields other than ``fixed`` (e.g. x, seed) against ``specs``; return the options."""
    out = {}
    for name, value in given.items():
        if name in fixed:
            continue
        if name not in specs:
            raise InputError(422, name, f"unknown field; allowed: {sorted(list(fixed) + list(specs))}")
        out[name] = check_option(name, value, specs[name], from_form=from_form)
    return out
