"""Serving the champion: the classifier a request reaches, request parsing, batching, the BentoML
service, its routes, API contract and web page, the inference log's writer process, and a Python
client (imports the layers below it, the registry's champion lookup among them; never a stage)."""
