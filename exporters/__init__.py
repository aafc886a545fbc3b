"""Exporters: trained model + static masks -> file (ONNX, NIR, netx).

Installed as the top-level package ``exporters``; each exporter registers through the entry-point group
``stata_deploy.exporters`` in pyproject.toml. Exporters import the core, never the runtimes.
"""
