"""Per-example log-likelihood scoring of any recipe that has ``log_prob`` (Ray-free parts).

Pipeline of ``raymanifold score`` (streaming, so memory stays flat as the input grows)::

    parse_data_spec(--data)                     spec.py      what to read (data set | Parquet | image folder)
    prepare(model, spec, opts)                  prepared.py  model resolved, input checked against
                                                             recipes.input_spec(cfg), in the driver
    Scorer (per actor) -> id, label, log_prob   scorer.py    plain torch; score_inprocess = the baseline loop
    Ray Data actor pool -> Parquet              raymanifold.distributed.scoring (the only Ray part)
    read_scores / summarize / plot_histogram    results.py   mean/std, AUROC (analysis.metrics), histogram

Everything here runs without Ray; :mod:`raymanifold.distributed.scoring`
runs :class:`Scorer` in a Ray Data ``ActorPoolStrategy`` pool.
"""
from raymanifold.scoring.prepared import Prepared, prepare
from raymanifold.scoring.results import column_means, plot_histogram, read_scores, summarize
from raymanifold.scoring.scorer import Scorer, dataset_rows, score_inprocess
from raymanifold.scoring.spec import DataSpec, load_spec_dataset, parse_data_spec

__all__ = ["column_means", "DataSpec", "Prepared", "Scorer", "dataset_rows", "load_spec_dataset", "parse_data_spec",
           "plot_histogram", "prepare", "read_scores", "score_inprocess", "summarize"]
