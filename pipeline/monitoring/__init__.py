"""Drift monitoring: the reference profile, the service's inference log (its records, where it is,
writing and reading), Evidently drift reports and the retraining decision (imports
:mod:`pipeline.core`, :mod:`pipeline.data`, :mod:`pipeline.features`, :mod:`pipeline.model`)."""
