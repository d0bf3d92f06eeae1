"""Judging a model: metrics with lesion-bootstrap CIs, the operating point, gates, baselines,
figures and the model card (imports :mod:`pipeline.core`, :mod:`pipeline.features`,
:mod:`pipeline.model`)."""
