"""The model store: packaged models (the BentoML model store), the champion and its history, Bento
builds, tracing a tag back to its code and data, and which model a command means.

``store`` (the stores and tags) < ``champions`` (which model is current; all the service needs) <
``package``, ``trace``, ``history``, ``bento``, ``resolve``. Import the module you need: this
package's ``__init__`` imports nothing, so the Bento ships only the service's part of it.
"""
