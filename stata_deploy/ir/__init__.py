"""One description of the network (issue 13): a small typed graph built once from the model, transformed by
passes that return new graphs, and lowered by its consumers. Read nodes.py, build.py, passes.py, count.py; then
lowered.py, the dialect a .nir file is read into (runtimes/nir_graph.py), executed and lowered to Lava."""
from .build import LOWERINGS, build_ir, structure_ir
from .nodes import Graph, IRError

__all__ = ["LOWERINGS", "Graph", "IRError", "build_ir", "structure_ir"]
