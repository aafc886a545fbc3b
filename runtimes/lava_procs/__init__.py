"""Lava processes for what lava.proc lacks (numpy only, never torch).

This package holds ONLY Lava process classes and their numpy kernels: Lava's compiler executes every ``.py`` file
in the folder of a custom process's module when it compiles a network, and process models run in forked children
of the simulator, where torch deadlocked once the parent had used torch's thread pool (DESIGN.md section 7).

Everything is batched: every port carries a ``(B, ...)`` array so that B samples run as parallel copies of one
network (one build, many samples). Timing follows Loihi: a ``Synapse`` delays by one step (like ``lava.proc.dense``),
every other process is combinational (receives and sends in the same step). A process that sits ``lag`` steps
behind the source sees model timestep ``t = (time_step - 1 - lag) mod T`` of chunk ``(time_step - 1 - lag) // T``,
so chunks of B samples stream back to back with period T (pipelined); neurons reset their state at ``t == 0``.
"""
from .processes import Delay, Neuron, Op1, Op2, Synapse, SynapseNeuron

__all__ = ["Delay", "Neuron", "Op1", "Op2", "Synapse", "SynapseNeuron"]
