"""The ``stata-deploy`` command: ``main`` (the Click group, error handling, signals, JSON output) and one module per
step: ``train`` (train, eval, prune, calibrate, presets), ``export``, ``run``, ``energy``, ``inspect``, ``kept``."""
