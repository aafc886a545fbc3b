"""Training: ``data`` (datasets and input encoding), ``loop`` (``TrainConfig``, ``train``), ``distributed`` (DDP
over processes), ``checkpoint`` (safetensors + JSON, resumable state)."""
