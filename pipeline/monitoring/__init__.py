"""Drift monitoring: the reference profile, the service's inference log, Evidently drift reports and
the retraining decision (imports :mod:`pipeline.core`, :mod:`pipeline.features`, :mod:`pipeline.model`)."""
