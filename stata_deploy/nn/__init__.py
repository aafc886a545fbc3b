"""The spiking network in torch: ``neurons`` (LIF and its token schedules), ``attention`` (SSA, SDSA, A²OS²A: a
registry), ``model`` (stem, blocks, head; pruning sites call ``stata_deploy.pruning``'s scorers)."""
