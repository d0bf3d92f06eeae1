"""Auditing a packaged model beyond its own test split: external validation on someone else's
labelled images (the evaluation's metrics with the monitoring's drift check) and data-version
diffs."""
