"""Auditing a packaged model beyond its own test split: external validation on someone else's
labelled images (combines the evaluation's metrics with the monitoring's drift check)."""
