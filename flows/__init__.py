"""lesionflow's Prefect flows: orchestration only (no ML logic here).

Importing this package creates the folders that ``$PREFECT_HOME`` and ``$BENTOML_HOME`` name, when
they are set and missing: Prefect does not create a missing parent folder (a fresh clone has no
``.lesionflow/``), and its ephemeral server then fails to start with "unable to open database
file". Every entry point that touches Prefect (``lesionflow run``, ``python -m flows.retrain``,
``python -m flows.monitor``) imports this package before Prefect.
"""

import os
from pathlib import Path

for _var in ("PREFECT_HOME", "BENTOML_HOME"):
    if os.environ.get(_var):
        Path(os.environ[_var]).expanduser().mkdir(parents=True, exist_ok=True)
