"""Analysis shared by the families and the reports (plain numpy/torch/matplotlib; no Ray, no MLflow).

* :mod:`.metrics`: the one ``auroc`` (one policy for non-finite scores) and the
  sliced Wasserstein distances with their order in the name (``sliced_wasserstein_w1``,
  ``sliced_wasserstein_w2``).
* :mod:`.plotting`: ``pyplot()``, the one place that selects matplotlib's backend.
* :mod:`.disentanglement`: MIG and DCI (disentanglement_lib protocol).
* :mod:`.fig5`: the Fig. 5 likelihood protocol of the demo (diffusion on 2-D sets).
"""
