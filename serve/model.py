"""One Serve deployment per served model: ``model_<name>`` runs its recipe's functions.

The model is rebuilt from its checkpoint with
:func:`raymanifold.checkpoint.load_model` (a path or an MLflow ``runs:/`` URI).
Model calls run on one worker thread, so the replica's event loop stays free
to accept requests while the model computes; that is what lets
``@serve.batch`` pool the requests that arrive meanwhile.

Pooling (every batchable operation: log-likelihood, encode, classify, purify): requests with equal options are
concatenated into one model call and the result is split back, at most
``batching.max_batch_examples`` examples per call. Deterministic functions
(encode) give the same numbers pooled or not. Random ones (the Eq. 15
estimator) pool only requests without ``seed``; a request with ``seed`` runs
alone with ``torch.Generator().manual_seed(seed)`` and reproduces
``recipe.log_prob(model, x, cfg, generator=...)`` exactly.

``check_health`` fails when the weights changed or became non-finite since
loading, or a model call has been running for longer than ``stuck_after_s``;
the Serve controller then replaces the replica.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from ray import serve

from raymanifold.recipes import input_spec
from serve.card import build_card
from serve.operations import OPERATIONS, Operation, is_random, option_specs, recipe_function
from serve.settings import Limits, ModelEntry, resolve_model_uri

STUCK_AFTER_S = 600.0


def _n_examples(items: list) -> int:
    return sum(len(it["x"]) for it in items)


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()))


def describe(name: str, uri: str, model, cfg, recipe, entry: ModelEntry, limits: Limits) -> dict:
    """The JSON description of a served model (``GET /v1/models``), read from the recipe protocol:
    input from :func:`raymanifold.recipes.input_spec` (``entry.input_shape`` overrides the shape), the latent
    shape from ``recipe.latent_shape`` (``decode`` needs it to validate z)."""
    spec = {"name": name, "family": cfg.family, "uri": uri, "config_name": cfg.name,
            "input": {"data": cfg.data.name, **input_spec(cfg, entry.input_shape).as_dict()},
            "unit": recipe.log_prob_unit,
            "operations": {}, "latent": None,
            "batching": entry.batching.model_dump()}
    for route, op in OPERATIONS.items():
        fn = recipe_function(recipe, op)
        if fn is not None:
            spec["operations"][route] = {"summary": op.summary, "random": is_random(fn),
                                         "options": option_specs(recipe, fn, cfg, max_rounds=limits.max_rounds)}
    if recipe.latent_shape is not None:
        spec["latent"] = {"shape": [int(s) for s in recipe.latent_shape(cfg)], "range": None}
    return spec


class ModelServer:
    """Serves one checkpoint. Public methods are called by the ingress through a DeploymentHandle."""

    def __init__(self, entry: dict, limits: dict, tracking_uri: Optional[str] = None,
                 switch_interval_s: Optional[float] = None):
        if switch_interval_s:  # its own replica (topology split): see AppSettings.gil_switch_interval_s
            sys.setswitchinterval(switch_interval_s)
        self.entry = ModelEntry.model_validate(entry)
        self.limits = Limits.model_validate(limits)
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        torch.set_num_threads(self.entry.torch_threads)
        from raymanifold.checkpoint import load_model
        from raymanifold.uris import install_uri_resolver

        install_uri_resolver(tracking_uri)  # runs:/ model URIs are resolved here, at the edge

        self.uri = resolve_model_uri(self.entry.uri)
        self.model, self.cfg, self.recipe = load_model(self.uri, use_ema=self.entry.use_ema)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype
        self.spec = describe(self.entry.name, self.entry.uri, self.model, self.cfg, self.recipe, self.entry,
                             self.limits)
        self.spec["card"] = build_card(self.model, self.cfg, self.recipe, uri=self.entry.uri,
                                       settings=self.entry.card, limits=self.limits.model_dump(),
                                       tracking_uri=tracking_uri)
        self._checksum = _checksum(self.model)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{self.entry.name}")
        self._busy_since: Optional[float] = None
        self._rng = random.Random()
        self.stats = {"requests": 0, "model_calls": 0, "pooled_batches": 0, "pooled_requests": 0, "errors": 0}
        b = self.entry.batching
        # One batch queue per served model: @serve.batch on the method would give every ModelServer of a
        # process one shared queue (topology "fused" holds several models in one replica, and a pooled call
        # would then run another model's requests through the first request's model).
        self._pooled = serve.batch(max_batch_size=b.max_batch_examples, batch_wait_timeout_s=b.wait_timeout_s,
                                   batch_size_fn=_n_examples)(self._pool_requests)

    # ------------------------------------------------------------------ called by the ingress
    def info(self) -> dict:
        return self.spec

    def health(self) -> dict:
        """Status for ``GET /healthz`` (raises like check_health when unhealthy)."""
        self.check_health()
        ctx = serve.get_replica_context()
        return {"status": "ok", "replica": ctx.replica_id.unique_id, "pid": os.getpid(), **self.stats}

    async def run(self, route: str, x: Optional[np.ndarray] = None, n: Optional[int] = None,
                  options: Optional[dict] = None, seed: Optional[int] = None) -> dict:
        """Run one request: ``{"values": ndarray, "seed", "batch", "cost"}`` or ``{"error": {...}}``."""
        op = OPERATIONS[route]
        fn = recipe_function(self.recipe, op)
        if fn is None:
            return _failure(404, "operation", f"model {self.entry.name!r} has no {route}")
        self.stats["requests"] += 1
        options = dict(options or {})
        random_fn = is_random(fn)
        b = self.entry.batching
        if (op.pooled and b.enabled and (seed is None or not random_fn) and x is not None
                and len(x) <= b.max_batch_examples):
            return await self._pooled({"route": route, "x": x, "options": options})
        if random_fn and seed is None:
            seed = self._rng.randrange(2 ** 63)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, op, x, n, options, seed)

    # ------------------------------------------------------------------ pooling
    async def _pool_requests(self, items: list[dict]) -> list[dict]:
        """Concatenate requests with equal (operation, options); one model call per group."""
        groups: dict = defaultdict(list)
        for i, it in enumerate(items):
            groups[(it["route"], tuple(sorted(it["options"].items())))].append(i)
        out: list = [None] * len(items)
        loop = asyncio.get_running_loop()
        for (route, opts), idx in groups.items():
            op = OPERATIONS[route]
            fn = recipe_function(self.recipe, op)
            x = np.concatenate([items[i]["x"] for i in idx])
            seed = self._rng.randrange(2 ** 63) if is_random(fn) else None
            res = await loop.run_in_executor(self._pool, self._call, op, x, None, dict(opts), seed)
            if "error" in res:  # run the group's requests one by one so only the faulty ones fail
                for i in idx:
                    out[i] = res if len(idx) == 1 else await loop.run_in_executor(
                        self._pool, self._call, op, items[i]["x"], None, dict(opts), seed)
                continue
            start = 0
            for i in idx:
                k = len(items[i]["x"])
                out[i] = {**res, "values": _rows(res["values"], start, start + k), "seed": None,
                          "batch": {"requests": len(idx), "examples": len(x)}}
                start += k
        self.stats["pooled_batches"] += 1
        self.stats["pooled_requests"] += len(items)
        return out

    # ------------------------------------------------------------------ the model call (worker thread)
    def _call(self, op: Operation, x, n, options: dict, seed: Optional[int]) -> dict:
        fn = recipe_function(self.recipe, op)
        kwargs = dict(options)
        if is_random(fn):
            kwargs["generator"] = torch.Generator().manual_seed(int(seed))
        self._busy_since = time.monotonic()
        self.stats["model_calls"] += 1
        try:
            with torch.no_grad():
                if op.takes == "count":
                    out = fn(self.model, int(n), self.cfg, **kwargs)
                else:
                    out = fn(self.model, torch.as_tensor(x, dtype=self.dtype), self.cfg, **kwargs)
            cost = self.recipe.cost_of(self.cfg, op.attr, **options)  # e.g. {"nfe": ...} per example
        except ValueError as exc:  # recipes raise ValueError("<field>: ...") for bad input
            field, _, msg = str(exc).partition(": ")
            self.stats["errors"] += 1
            return _failure(422, field if msg and " " not in field else "request", str(exc))
        except Exception as exc:  # a bug or a broken model: 500, and the replica keeps serving
            self.stats["errors"] += 1
            return _failure(500, "model", f"internal error in {op.attr}: {exc.__class__.__name__}: {exc}"[:500])
        finally:
            self._busy_since = None
        values = ({k: v.detach().cpu().numpy() for k, v in out.items()} if isinstance(out, dict)
                  else out.detach().cpu().numpy())
        return {"values": values, "seed": seed, "batch": None, "cost": cost}

    # ------------------------------------------------------------------ Serve health check
    def check_health(self):
        busy = self._busy_since
        if busy is not None and time.monotonic() - busy > STUCK_AFTER_S:
            raise RuntimeError(f"model {self.entry.name!r}: a model call has been running for "
                               f"{time.monotonic() - busy:.0f} s")
        s = _checksum(self.model)
        if not math.isfinite(s) or s != self._checksum:
            raise RuntimeError(f"model {self.entry.name!r}: weights changed since loading "
                               f"(checksum {s!r} != {self._checksum!r})")


def _rows(values, start: int, stop: int):
    """Rows [start, stop) of a result: an array, or a dict of per-example arrays."""
    if isinstance(values, dict):
        return {k: v[start:stop] for k, v in values.items()}
    return values[start:stop]


def _failure(status: int, field: str, message: str) -> dict:
    return {"error": {"status": status, "field": field, "message": message}}
