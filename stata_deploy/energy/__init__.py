"""Counting and pricing: ``counter`` (synaptic operations per layer, a lowering of the IR and a ``RunResult``) and
``profiles`` (named hardware profiles in ``hardware/*.json``, energy per inference)."""
