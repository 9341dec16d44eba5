"""The pipeline layer: lake and feature store in, registered and scored models out.

``models/`` holds estimators, specs and metrics and knows nothing of where data
lives; this layer wires them to the project's stores, one module per stage:

* :mod:`~propensity.pipeline.dataset` assembles every frame a model trains or
  scores on (labels → Feast historical features; exposures → features at
  exposure time);
* :mod:`~propensity.pipeline.gates` holds typed gate checks and the one
  promotion rule;
* :mod:`~propensity.pipeline.binary` and :mod:`~propensity.pipeline.nba` train,
  evaluate and register the propensity models and next-best-action;
  :mod:`~propensity.pipeline.train` picks one of them by model name;
* :mod:`~propensity.pipeline.score` scores customers in bulk.

The CLI, :class:`~propensity.project.Project`, the quickstart and the retraining
job are short sequences of these calls. Submodules are imported on use, so
``import propensity.pipeline`` stays cheap.
"""

__all__ = ["binary", "dataset", "gates", "nba", "score", "train"]
