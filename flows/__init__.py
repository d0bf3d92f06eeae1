"""lesionflow's Prefect flows: orchestration only (no ML logic here).

Importing this package configures the environment before Prefect is imported
(:func:`pipeline.core.project.configure`): the project root is found from the working directory,
``PREFECT_HOME`` and ``BENTOML_HOME`` default to the project's ``.lesionflow/`` stores (created
when missing), and Prefect's, DVC's and BentoML's telemetry is off. So ``python -m flows.retrain``,
``python -m flows.monitor`` and ``python -m flows.features`` need nothing from the shell.
"""

from pipeline.core import project as _project

_project.configure()
