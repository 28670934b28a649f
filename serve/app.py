"""The Serve application: a FastAPI ingress that runs the models in its own replica (topology ``fused``, the
default: proxy -> one replica) or calls one deployment per model (topology ``split``).

Routes (OpenAPI at ``/docs``)::

    GET  /                                    the web page (serve/web.py, serve/static/; docs/web.md)
    GET  /healthz                             every model replica answers and is healthy
    GET  /v1/models                           served models: family, input shape/range, operations, options
    POST /v1/models/{name}/log-likelihood     x (JSON) or PNG uploads -> log p per example, with its unit
    POST /v1/models/{name}/sample             n, seed, options -> arrays, or a PNG grid (format=png)
    POST /v1/models/{name}/encode             x -> latent z (latent models)
    POST /v1/models/{name}/decode             z -> x, or a PNG grid
    POST /v1/models/{name}/classify           x -> predicted label and class probabilities (classifiers)
    POST /v1/models/{name}/purify             x -> purified x (or PNG), label, ELBO before / after (Eq. 22)

The ingress validates every request against the model's description (shape,
channels, finiteness, range, sizes, option names/types/bounds/choices) and
answers 4xx naming the field before a model sees it. Optional API keys
(:mod:`serve.auth`) guard every route except ``/healthz`` and the page's files. Routes are
thin: each names an operation of :data:`serve.operations.OPERATIONS` and
calls :meth:`Ingress._operate`; a model offers the operations its recipe
defines, so a new family (or a new operation such as ``purify``) adds a row
and a route, not a new structure.

``build_app(args)`` is the builder named in serve/config.yaml
(``import_path: serve.app:build_app``); ``args`` are validated by
:mod:`serve.settings`.
"""
import asyncio
import inspect
import json
import sys
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.requests import Request as StarletteRequest

from serve import auth, codec, web
from serve.model import ModelServer
from serve.operations import OPERATIONS, InputError, check_options, check_seed
from serve.settings import REPO_ROOT, Limits, SettingsError, parse_settings, resolve_model_uri
from serve.settings import absolute_model_uris  # noqa: F401 (raymanifold serve's hook: relative paths, output root)

MODEL_DEFAULTS = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64,
                  "health_check_period_s": 10.0, "health_check_timeout_s": 30.0}
INGRESS_DEFAULTS = {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256}
#: the one deployment of the fused topology: HTTP, validation and every model's calls in one replica
FUSED_DEFAULTS = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 256,
                  "health_check_period_s": 10.0, "health_check_timeout_s": 30.0}
FORMATS = ("json", "png")

app = FastAPI(
    title="raymanifold",
    version="1",
    description="Log-likelihoods, samples and latents of trained raymanifold models. "
                "Errors are JSON {\"detail\": {\"field\", \"message\"}} with a 4xx status naming the field.",
)


web.mount(app)  # the web page at / (serve/web.py)
app.add_middleware(auth.ApiKeyMiddleware)  # optional API keys (serve/auth.py); open when none are configured


@app.exception_handler(InputError)
async def _input_error(request, exc: InputError):
    return JSONResponse({"detail": exc.as_dict()}, status_code=exc.status)


@app.exception_handler(Exception)
async def _unexpected(request, exc: Exception):
    return JSONResponse({"detail": {"field": "server", "message": f"internal error: {exc.__class__.__name__}"}},
                        status_code=500)


def _body_doc(fields: dict, required: list, multipart: bool) -> dict:
    content = {"application/json": {"schema": {"type": "object", "properties": fields, "required": required}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                       "description": "PNG files of the model's size and channel count"}},
            "additionalProperties": {"type": "string"}}}
    return {"requestBody": {"required": True, "content": content}}


_ARRAY = {"type": "array", "items": {}}
_OPTS = "further fields: the model's options, listed under operations.<route>.options by GET /v1/models"
DOCS = {
    "log-likelihood": _body_doc({"x": {**_ARRAY, "description": "examples, shape (B, *input.shape)"},
                                 "seed": {"type": "integer", "description": "reproducible estimate (random estimators)"},
                                 "dt": {"type": "integer", "description": "diffusion step size"},
                                 "rounds": {"type": "integer", "description": "diffusion Eq. 15 rounds"}},
                                ["x"], True),
    "sample": _body_doc({"n": {"type": "integer"}, "seed": {"type": "integer"},
                         "format": {"type": "string", "enum": list(FORMATS)},
                         "sampler": {"type": "string", "description": "diffusion sampler"},
                         "dt": {"type": "integer", "description": "diffusion step size"}}, ["n"], False),
    "encode": _body_doc({"x": {**_ARRAY, "description": "examples, shape (B, *input.shape)"}}, ["x"], True),
    "decode": _body_doc({"z": {**_ARRAY, "description": "latents, shape (B, *latent.shape)"},
                         "format": {"type": "string", "enum": list(FORMATS)}}, ["z"], False),
    "classify": _body_doc({"x": {**_ARRAY, "description": "images, shape (B, *input.shape)"}}, ["x"], True),
    "purify": _body_doc({"x": {**_ARRAY, "description": "images, shape (B, *input.shape)"},
                         "seed": {"type": "integer", "description": "reproducible restarts / z samples"},
                         "iterations": {"type": "integer", "description": "Eq. 22 sign-gradient steps"},
                         "step": {"type": "number"}, "restarts": {"type": "integer"},
                         "eps": {"type": "number", "description": "L-inf bound of the perturbation (0 = none)"},
                         "format": {"type": "string", "enum": list(FORMATS)}}, ["x"], True),
    "counterfactual": _body_doc({"x": {**_ARRAY, "description": "image pairs, shape (2P, *input.shape)"},
                                 "segments": {"type": "string", "description": "segments of z to swap, e.g. 1-2"},
                                 "scale": {"type": "number"}, "dt": {"type": "integer"},
                                 "format": {"type": "string", "enum": list(FORMATS)}}, ["x"], True),
}


@serve.ingress(app)
class Ingress:
    """HTTP front: validation, routing to ``model_<name>`` deployments, JSON/PNG encoding."""

    def __init__(self, models: dict, limits: dict, key_digests: tuple = (), local: Optional[dict] = None,
                 switch_interval_s: Optional[float] = None):
        """``models``: name -> DeploymentHandle of a ``model_<name>`` deployment (topology ``split``), or
        ``local = {"cls", "entries", "tracking_uri"}``: every model is built in this replica and called
        in-process (topology ``fused``: no handle hop, no second serialisation)."""
        self.limits = Limits.model_validate(limits)
        auth.configure(key_digests)  # SHA-256 of the API keys, checked by auth.ApiKeyMiddleware
        if switch_interval_s:  # see serve.settings.AppSettings.gil_switch_interval_s
            sys.setswitchinterval(switch_interval_s)
        self.fused = local is not None
        if self.fused:
            self.handles = {e["name"]: local["cls"](e, limits, local["tracking_uri"]) for e in local["entries"]}
        else:
            self.handles = models
        self._specs: dict[str, dict] = {}

    # ------------------------------------------------------------------ plumbing
    async def _call(self, name: str, method: str, *args, timeout: Optional[float] = None, **kwargs):
        if self.fused:
            return await self._call_local(name, method, *args, timeout=timeout, **kwargs)
        handle = getattr(self.handles[name], method)
        try:
            return await asyncio.wait_for(handle.remote(*args, **kwargs), timeout or self.limits.timeout_s)
        except asyncio.TimeoutError:
            raise InputError(504, "name", f"model {name!r} did not answer within "
                                          f"{timeout or self.limits.timeout_s:g} s") from None
        except Exception as exc:  # replica died / restarting / unschedulable
            raise InputError(503, "name", f"model {name!r} is unavailable ({exc.__class__.__name__}); "
                                          "retry shortly") from None

    async def _call_local(self, name: str, method: str, *args, timeout: Optional[float] = None, **kwargs):
        """``_call`` of the fused topology: the model object lives in this replica."""
        try:
            res = getattr(self.handles[name], method)(*args, **kwargs)
            if inspect.isawaitable(res):
                res = await asyncio.wait_for(res, timeout or self.limits.timeout_s)
            return res
        except asyncio.TimeoutError:
            raise InputError(504, "name", f"model {name!r} did not answer within "
                                          f"{timeout or self.limits.timeout_s:g} s") from None
        except Exception as exc:  # unhealthy (health) or broken
            raise InputError(503, "name", f"model {name!r} is unavailable ({exc.__class__.__name__}: {exc})"[:300]
                             ) from None

    def check_health(self):
        """Serve's health check: in the fused topology, every in-process model's (raises when one is broken,
        and the controller replaces this replica)."""
        if self.fused:
            for model in self.handles.values():
                model.check_health()

    async def _spec(self, name: str) -> dict:
        if name not in self.handles:
            raise InputError(404, "name", f"unknown model {name!r}; served models: {sorted(self.handles)}")
        if name not in self._specs:
            self._specs[name] = await self._call(name, "info")
        return self._specs[name]

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InputError(413, "body", f"{int(declared)} bytes exceed the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise InputError(413, "body", f"more than the limit of {limit} bytes")
        return bytes(body)

    async def _parse(self, request: Request, multipart_ok: bool) -> tuple[dict, list[bytes], bool]:
        """(fields, PNG files, from_form) of a JSON or multipart body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._read_body(request)
        if ctype == "multipart/form-data" and multipart_ok:
            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}
            try:
                form = await StarletteRequest(request.scope, receive).form(
                    max_files=self.limits.max_examples + 1, max_fields=64)
            except Exception as exc:
                raise InputError(400, "body", f"malformed multipart form ({exc})"[:300]) from None
            fields, files = {}, []
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key in fields:
                        raise InputError(422, key, "given more than once")
                    fields[key] = value
                elif key != "images":
                    raise InputError(422, key, "unknown file field; upload PNG files as 'images'")
                else:
                    files.append(await value.read())
            if not files:
                raise InputError(422, "images", "upload at least one PNG file in the 'images' field")
            return fields, files, True
        allowed = "application/json" + (" or multipart/form-data (PNG uploads)" if multipart_ok else "")
        if ctype not in ("application/json", ""):
            raise InputError(415, "content-type", f"{ctype!r} is not accepted; send {allowed}")
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(400, "body", f"not valid JSON ({exc})"[:300]) from None
        except RecursionError:
            raise InputError(400, "body", "JSON nested too deeply") from None
        if not isinstance(fields, dict):
            raise InputError(422, "body", f"expected a JSON object, got {type(fields).__name__}")
        return fields, [], False

    def _examples(self, fields: dict, files: list[bytes], spec: dict, key: str) -> np.ndarray:
        """The validated input array of a data ("x"/PNG) or latent ("z") operation."""
        lim = self.limits
        if key == "z":
            return codec.as_array(fields.get("z"), "z", spec["latent"]["shape"], max_examples=lim.max_examples,
                                  value_range=None, max_abs=lim.max_abs)
        inp = spec["input"]
        if files:
            if inp["kind"] != "image":
                raise InputError(422, "images", f"PNG uploads need an image model; {spec['name']!r} takes "
                                                f"points of shape {inp['shape']} as JSON 'x'")
            if len(files) > lim.max_examples:
                raise InputError(413, "images", f"{len(files)} files exceed the limit of {lim.max_examples}")
            arr = np.stack([codec.decode_png(f, f"images[{i}]", inp["shape"]) for i, f in enumerate(files)])
            return arr
        if "x" not in fields:
            hint = " (or upload PNG files as multipart 'images')" if inp["kind"] == "image" else ""
            raise InputError(422, "x", f"required: an array of shape (B, {', '.join(map(str, inp['shape']))}){hint}")
        return codec.as_array(fields["x"], "x", inp["shape"], max_examples=lim.max_examples,
                              value_range=inp["range"], max_abs=lim.max_abs)

    async def _operate(self, name: str, route: str, request: Request):
        """Validate, run ``route`` on model ``name``, encode the answer (JSON or PNG)."""
        spec = await self._spec(name)
        op = OPERATIONS[route]
        ospec = spec["operations"].get(route)
        if ospec is None:
            raise InputError(404, "name", f"model {name!r} (family {spec['family']}) has no {route}; "
                                          f"its operations: {sorted(spec['operations'])}")
        fields, files, from_form = await self._parse(request, multipart_ok=op.takes == "data")
        fixed = {"data": ("x",), "latent": ("z",), "count": ("n",)}[op.takes] + ("seed",) * ospec["random"] \
            + ("format",) * op.data_out
        options = check_options(fields, ospec["options"], fixed=fixed, from_form=from_form)
        seed = check_seed(fields.get("seed"), from_form=from_form) if ospec["random"] else None
        fmt = fields.get("format", "json")
        if fmt not in FORMATS:
            raise InputError(422, "format", f"unknown format {fmt!r}; allowed: {list(FORMATS)}")
        if fmt == "png" and spec["input"]["kind"] != "image":
            raise InputError(422, "format", f"'png' needs an image model; {name!r} produces points")
        x, n = None, None
        if op.takes == "count":
            n = fields.get("n")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InputError(422, "n", f"required: an integer in [1, {self.limits.max_samples}], got {n!r}")
            if n > self.limits.max_samples:
                raise InputError(413, "n", f"{n} exceeds the limit of {self.limits.max_samples} samples per request")
        else:
            x = self._examples(fields, files, spec, "z" if op.takes == "latent" else "x")
        res = await self._call(name, "run", route, x=x, n=n, options=options, seed=seed)
        if "error" in res:
            e = res["error"]
            raise InputError(e["status"], e["field"], e["message"].partition(": ")[2] or e["message"])
        values, extras = res["values"], {}
        if isinstance(values, dict):  # e.g. purify: the purified x plus prediction and ELBO before / after
            extras = {k: v for k, v in values.items() if k != op.result}
            values = values[op.result]
        if fmt == "png":
            return Response(codec.png_grid(np.clip(values, 0, 1)), media_type="image/png")
        data, non_finite = codec.to_json(values)
        out = {"model": name, "family": spec["family"], op.result: data, "shape": list(values.shape),
               "options": {**{k: v["default"] for k, v in ospec["options"].items()}, **options}}
        for k, v in extras.items():
            out[k], bad = codec.to_json(v)
            non_finite = non_finite or bad
        if route == "log-likelihood":
            out["unit"] = spec["unit"]
        if ospec["random"]:
            out["seed"] = res["seed"]
        for k, v in (res.get("cost") or {}).items():  # the recipe's cost per example, e.g. "nfe"
            out.setdefault(k, v)
        if res.get("batch") is not None:
            out["batch"] = res["batch"]
        if non_finite:
            out["non_finite"] = non_finite
        return out

    # ------------------------------------------------------------------ routes
    @app.get("/healthz", summary="200 if every model replica answers and passes its health check, else 503")
    async def healthz(self):
        async def one(name):
            try:
                return name, await self._call(name, "health", timeout=10.0)
            except InputError as exc:
                return name, {"status": "unavailable", "error": exc.message}
        results = dict(await asyncio.gather(*(one(n) for n in self.handles)))
        ok = all(r.get("status") == "ok" for r in results.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": results}, status_code=200 if ok else 503)

    @app.get("/v1/models", summary="Served models: family, input shape and range, operations and their options")
    async def list_models(self):
        out = []
        for name in self.handles:
            try:
                out.append({**await self._spec(name), "status": "ok"})
            except InputError as exc:
                out.append({"name": name, "status": "unavailable", "error": exc.message})
        return {"models": out}

    @app.post("/v1/models/{name}/log-likelihood", summary=OPERATIONS["log-likelihood"].summary,
              openapi_extra=DOCS["log-likelihood"])
    async def log_likelihood(self, name: str, request: Request):
        return await self._operate(name, "log-likelihood", request)

    @app.post("/v1/models/{name}/sample", summary=OPERATIONS["sample"].summary, openapi_extra=DOCS["sample"])
    async def sample(self, name: str, request: Request):
        return await self._operate(name, "sample", request)

    @app.post("/v1/models/{name}/encode", summary=OPERATIONS["encode"].summary, openapi_extra=DOCS["encode"])
    async def encode(self, name: str, request: Request):
        return await self._operate(name, "encode", request)

    @app.post("/v1/models/{name}/counterfactual", summary=OPERATIONS["counterfactual"].summary,
              openapi_extra=DOCS["counterfactual"])
    async def counterfactual(self, name: str, request: Request):
        return await self._operate(name, "counterfactual", request)

    @app.post("/v1/models/{name}/decode", summary=OPERATIONS["decode"].summary, openapi_extra=DOCS["decode"])
    async def decode(self, name: str, request: Request):
        return await self._operate(name, "decode", request)

    @app.post("/v1/models/{name}/classify", summary=OPERATIONS["classify"].summary, openapi_extra=DOCS["classify"])
    async def classify(self, name: str, request: Request):
        return await self._operate(name, "classify", request)

    @app.post("/v1/models/{name}/purify", summary=OPERATIONS["purify"].summary, openapi_extra=DOCS["purify"])
    async def purify(self, name: str, request: Request):
        return await self._operate(name, "purify", request)


IngressDeployment = serve.deployment(name="Ingress")(Ingress)


def _merge(defaults: dict, given: dict) -> dict:
    out = {**defaults, **given}
    out["ray_actor_options"] = {**defaults.get("ray_actor_options", {}), **given.get("ray_actor_options", {})}
    return out


def _check_local_checkpoints(settings):
    """Fail before deploying when a local checkpoint path is missing (MLflow URIs are resolved by the replica)."""
    from raymanifold.checkpoint import CheckpointError, resolve

    for i, m in enumerate(settings.models):
        uri = resolve_model_uri(m.uri)
        if uri.startswith("/"):
            try:
                resolve(uri)
            except CheckpointError:
                raise SettingsError(f"args.models.{i}.uri: {m.uri!r} ({uri}) does not exist; train it first "
                                    "(make demo writes ray_results/demo_swiss_roll/step_00008000 under the output "
                                    "root) or serve any run with raymanifold serve --model NAME=runs:/<run_id>") from None


def configured_keys(args: dict) -> list[str]:
    """The API keys ``args`` configure (env var / key file), for a local client such as ``raymanifold serve
    --check``; [] when the app is open."""
    a = parse_settings(args).auth
    try:
        return auth.read_keys(a.keys_env, a.keys_file, repo_root=REPO_ROOT)
    except auth.KeysError as exc:
        raise SettingsError(str(exc)) from None


def direct_ingress_port(args: dict, http_port: int) -> Optional[int]:
    """The HTTP port of the first ingress replica under Serve's direct ingress (``args.direct_ingress``), or
    None when it is off; read by ``raymanifold serve`` before it starts Ray."""
    d = parse_settings(args).direct_ingress
    return (d.port or int(http_port) + 1) if d.enabled else None


def api_key_digests(settings) -> tuple:
    """Digests of the configured API keys (``args.auth``); prints whether the app is open or keyed
    (never a key). Raises SettingsError for unusable keys or ``auth.required`` without any."""
    a = settings.auth
    try:
        keys = auth.read_keys(a.keys_env, a.keys_file, repo_root=REPO_ROOT)
    except auth.KeysError as exc:
        raise SettingsError(str(exc)) from None
    if not keys and a.required:
        raise SettingsError(f"args.auth.required: no API key found (set ${a.keys_env} or args.auth.keys_file)")
    if keys:
        print(f"raymanifold serve: API keys on ({len(keys)} key(s)); every route except /healthz and the web "
              "page's files needs 'Authorization: Bearer <key>'", flush=True)
    else:
        print(f"raymanifold serve: no API keys (${a.keys_env} unset, no args.auth.keys_file): every route is "
              "open to any caller that reaches the port; keep http_options.host at 127.0.0.1 (loopback only)",
              flush=True)
    return auth.digests(keys)


def build_app(args: dict):
    """The Serve application builder (``import_path: serve.app:build_app``; Serve passes the ``args`` dict)."""
    return build_application(args)


def build_application(args: dict, model_cls: type = ModelServer, ingress_cls: type = Ingress):
    """Ingress + one ``model_<name>`` deployment per entry of ``args.models`` (see serve/config.yaml).

    ``args.topology``: ``fused`` (default) runs every model inside the ingress replica (one hop: proxy ->
    replica); ``split`` gives each model its own deployment behind the ingress (scales models apart).
    ``model_cls`` / ``ingress_cls`` let tests serve subclasses with probes.
    """
    settings = parse_settings(args)
    _check_local_checkpoints(settings)
    digests = api_key_digests(settings)
    limits = settings.limits.model_dump()
    if settings.topology == "fused":
        ignored = [m.name for m in settings.models if m.deployment]
        if ignored:
            print(f"raymanifold serve: topology 'fused' runs every model inside the ingress replica; the "
                  f"per-model deployment options of {ignored} apply to topology 'split' only (set "
                  "args.ingress.deployment)", flush=True)
        ingress = serve.deployment(ingress_cls, name="Ingress").options(
            **_merge(FUSED_DEFAULTS, settings.ingress.deployment))
        local = {"cls": model_cls, "entries": [m.model_dump() for m in settings.models],
                 "tracking_uri": settings.tracking_uri}
        return ingress.bind({}, limits, digests, local, settings.gil_switch_interval_s)
    handles = {}
    for m in settings.models:
        dep = serve.deployment(model_cls, name=f"model_{m.name}").options(**_merge(MODEL_DEFAULTS, m.deployment))
        handles[m.name] = dep.bind(m.model_dump(), limits, settings.tracking_uri, settings.gil_switch_interval_s)
    ingress = serve.deployment(ingress_cls, name="Ingress").options(**_merge(INGRESS_DEFAULTS,
                                                                             settings.ingress.deployment))
    return ingress.bind(handles, limits, digests, None, settings.gil_switch_interval_s)
