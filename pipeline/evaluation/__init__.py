"""Judging a model: the evaluation's steps and outputs, metrics with lesion-bootstrap CIs, the
operating point, gates, baselines, figures and the model card (imports :mod:`pipeline.core`,
:mod:`pipeline.data`, :mod:`pipeline.features`, :mod:`pipeline.model`)."""
