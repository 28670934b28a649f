"""The application's ``args`` (the ``args:`` block of serve/config.yaml), validated with pydantic.

Unknown keys and out-of-range values are refused before anything is deployed,
with the key's path and what is allowed (:class:`SettingsError`).

Relative checkpoint paths name outputs of training runs: ``raymanifold serve`` makes them absolute against
the output root (``RAYMANIFOLD_HOME`` or the current directory, where ``make demo`` leaves
``ray_results/``; :func:`absolute_model_uris`) before anything is deployed. An application deployed
otherwise (``serve deploy``) resolves what is still relative against the repository root (the folder
holding ``serve/``; :func:`resolve_model_uri`). ``runs:/`` and ``models:/`` URIs go to MLflow.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Serve deployment options a config may set per deployment (passed to ``.options()``)
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                   "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s",
                   "max_queued_requests")


class SettingsError(ValueError):
    """The application's args are invalid (message names the key and what is allowed)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Per-request bounds; a request over one gets a 413/422 naming the field."""
    max_examples: int = Field(1024, ge=1, description="examples (points/images/latents) per request")
    max_body_bytes: int = Field(8_000_000, ge=1024, description="request body size")
    max_samples: int = Field(1024, ge=1, description="n of a sample request")
    max_rounds: int = Field(64, ge=1, description="diffusion Eq. 15 rounds per request")
    max_abs: float = Field(1000.0, gt=0, description="largest |value| accepted for unbounded (point) inputs")
    timeout_s: float = Field(120.0, gt=0, description="ingress waits this long for a model replica")


class Batching(_Strict):
    """``@serve.batch`` pooling of log-likelihood and encode requests on a model replica."""
    enabled: bool = True
    max_batch_examples: int = Field(2048, ge=1, description="examples pooled into one model call")
    wait_timeout_s: float = Field(0.005, ge=0, le=10, description="wait for more requests after the first")


class CardSettings(_Strict):
    """What ``GET /v1/models`` tells about a model beyond its operations (:mod:`serve.card`, the web page)."""
    reference_examples: int = Field(256, ge=0, le=100_000,
                                    description="training examples scored at start-up for the log-likelihood "
                                                "histogram and the off-manifold threshold (0 = none)")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="log-likelihood options of the reference scores (e.g. {dt: 10}); "
                                                "the page uses them as its defaults")
    seed: int = Field(0, ge=0, description="seed of the reference scores and of the page's estimates")
    threshold_quantile: float = Field(0.05, gt=0, lt=1, description="off-manifold below this quantile")
    max_nfe: int = Field(20_000, ge=1, description="budget of network evaluations for the reference: fewer "
                                                   "examples (at least 16) when the options cost more per example")
    mlflow_ui: Optional[str] = Field(None, description="base URL of an MLflow UI on the model's tracking store "
                                                        "(the page links the run)")
    ood_calibration: Optional[str] = Field(None, description="calibration.json of `raymanifold study ood`: the verdict "
                                                             "uses its threshold and detector for this model's URI")


class ModelEntry(_Strict):
    name: str = Field(description="URL name: /v1/models/<name>/...")
    uri: str = Field(description="checkpoint file/folder (relative: to the output root) or runs:/<run_id>")
    use_ema: bool = True
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads per replica")
    input_shape: Optional[list[int]] = Field(None, description="override the per-example input shape")
    batching: Batching = Batching()
    deployment: dict[str, Any] = Field(default_factory=dict, description="Serve deployment options")
    card: CardSettings = CardSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid model name (letters, digits, _ . -; at most 64 characters)")
        return v

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, v):
        return _check_deployment(v)


class IngressSettings(_Strict):
    deployment: dict[str, Any] = Field(default_factory=dict, description="Serve deployment options")

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, v):
        return _check_deployment(v)


class AuthSettings(_Strict):
    """Optional API keys (:mod:`serve.auth`): from the environment variable ``keys_env`` and/or the file
    ``keys_file`` (absolute path outside the repository); none found = every route open (serve on loopback)."""
    keys_env: Optional[str] = Field("RAYMANIFOLD_API_KEYS", description="environment variable holding keys "
                                                                         "(comma or space separated)")
    keys_file: Optional[str] = Field(None, description="file of keys, one per line (absolute path, outside the repo)")
    required: bool = Field(False, description="refuse to start when no key is found")


class DirectIngressSettings(_Strict):
    """Ray Serve's direct ingress (Ray 2.60, ``RAY_SERVE_ENABLE_DIRECT_INGRESS``): each ingress replica runs its
    own HTTP server, so a request skips Serve's proxy process and its Ray hop (docs/serve.md). A setting of the
    whole Serve instance: ``raymanifold serve`` turns it on for the Ray it starts; on a cluster started with
    ``ray start`` it follows that environment. Serve's proxy keeps answering on ``http_options.port``."""
    enabled: bool = Field(True, description="serve HTTP from the replicas themselves as well as via the proxy")
    port: Optional[int] = Field(None, ge=1024, le=65000, description="HTTP port of the first ingress replica (the "
                                "next replicas take the next free ports); None: http_options.port + 1")


class AppSettings(_Strict):
    topology: Literal["fused", "split"] = Field("fused", description="fused: the models run inside the ingress "
                                                "replica (fewest hops); split: one deployment per model")
    models: list[ModelEntry] = Field(min_length=1)
    gil_switch_interval_s: Optional[float] = Field(
        None, gt=0, le=0.1, description="sys.setswitchinterval of each replica (None: Python's 5 ms). A "
        "model call holds the GIL in small torch ops; a shorter interval lets the replica's event loop take "
        "requests meanwhile. Measured (docs/serve.md): 0.2 ms gave no gain over 5 ms, hence the default")
    limits: Limits = Limits()
    ingress: IngressSettings = IngressSettings()
    auth: AuthSettings = AuthSettings()
    direct_ingress: DirectIngressSettings = DirectIngressSettings()
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI for runs:/ model URIs")

    @model_validator(mode="after")
    def _unique(self):
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {dup}")
        return self


def _check_deployment(v: dict) -> dict:
    bad = sorted(set(v) - set(DEPLOYMENT_KEYS))
    if bad:
        raise ValueError(f"unknown deployment option(s) {bad}; allowed: {list(DEPLOYMENT_KEYS)}")
    return v


def parse_settings(args: dict | None) -> AppSettings:
    """Validate the application args; raise :class:`SettingsError` naming the offending key."""
    try:
        return AppSettings.model_validate(args or {})
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "args"
            lines.append(f"args.{loc}: {e['msg']}")
        raise SettingsError("; ".join(lines)) from None


def absolute_model_uris(args: dict, base) -> dict:
    """A copy of the application ``args`` whose relative ``models[].uri`` paths are absolute against ``base``
    (``raymanifold serve``: the output root); URIs and absolute paths unchanged."""
    out = dict(args or {})
    models = []
    for m in out.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("uri"), str) and m["uri"] \
                and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", m["uri"]):
            p = Path(m["uri"]).expanduser()
            m = {**m, "uri": str(p if p.is_absolute() else Path(base) / p)}
        models.append(m)
    if "models" in out:
        out["models"] = models
    return out


def resolve_model_uri(uri: str) -> str:
    """MLflow URIs as they are; relative paths (left relative by ``serve deploy``) against the repository root."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", uri):
        return uri
    p = Path(uri).expanduser()
    return str(p if p.is_absolute() else REPO_ROOT / p)
