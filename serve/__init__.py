"""The raymanifold Ray Serve application: a top-level package installed with raymanifold
(pyproject.toml ``[tool.setuptools.packages.find]``), so Ray workers import it by name.

* :mod:`serve.app`: the FastAPI ingress and ``build_app(args)``, the builder
  named by ``import_path: serve.app:build_app`` in ``serve/config.yaml``.
* :mod:`serve.model`: one served model: ``@serve.batch`` pooling and ``check_health``; built inside
  the ingress replica (topology ``fused``) or as its own deployment ``model_<name>`` (``split``).
* :mod:`serve.auth`: optional API keys (``Authorization: Bearer``; SHA-256 digests, constant-time compare).
* :mod:`serve.operations`: the table of operations (log-likelihood, sample,
  encode, decode) dispatched on a recipe's optional functions, and the
  option schemas read from their signatures.
* :mod:`serve.codec`: JSON arrays and PNG in and out (numpy and Pillow only).
* :mod:`serve.settings`: the validated ``args`` of the application.
* :mod:`serve.web`, ``serve/static/``: the web page at ``/`` (docs/web.md);
  :mod:`serve.card`: each model's card in ``GET /v1/models`` (MLflow run, training-set
  log-likelihood histogram, latent grid); :mod:`serve.webdemo`: demo models and screenshots.

Start it locally with ``raymanifold serve``; deploy it to a cluster with
``serve deploy serve/config.yaml`` (see docs/serve.md).
"""
