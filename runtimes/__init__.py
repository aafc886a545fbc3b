"""Runtimes: exported file -> spikes + counts (torch reference, ONNX Runtime, Lava).

Installed as the top-level package ``runtimes``; each runtime registers through the entry-point group
``stata_deploy.runtimes`` in pyproject.toml. Runtimes import the core, never the exporters.
"""
