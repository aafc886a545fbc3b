"""Synaptic-operation counting from a ``RunResult`` — the one counter every runtime shares.

    report = count_ops(cfg, result, masks)      # per sample: report.acs, .macs, .attention_ops, .sops, .layers

The counter does not hook the torch model: it rebuilds every synaptic layer's input from the recorded neuron
outputs (``RunResult.spikes``), the encoded input, the kept token positions (``RunResult.kept``) and the network's
IR (``stata_deploy/ir``: built from the model ``cfg`` describes; ``ir/count.py`` is the counter, one function per
node type). So the torch reference, ONNX Runtime and Lava give counts that compare number for number. This module
keeps the report types (``LayerOps``, ``OpsReport``) and the entry point ``count_ops``.

Conventions (all counts are per inference = summed over the batch, divided by the batch size; per timestep in
``*_t``):

* **AC** (accumulate, spike/integer driven). A synaptic layer (Conv/Linear) whose input row holds integers — binary
  spikes, or the residual stream, a sum of spike tensors with values 0, 1, 2, ... — costs
  ``sum(|x|) x fan-out``: an input of value 2 is two spikes arriving at the same synapses. Fan-out is the number of
  weights an input element touches: ``out_features`` for a Linear, ``out_channels x (valid kernel positions)`` for
  the 3x3 / padding 1 convs (border pixels reach fewer outputs). Weights are assumed non-zero (trained float
  weights are). Bias and folded BatchNorm are part of the neuron update, not counted as synaptic ops.
* **MAC** (multiply-accumulate, real-valued input): ``nonzero(x) x fan-out``. Used for the first conv on pixels
  (per sample and timestep: real-valued unless every pixel is an integer, as with event counts), the anchor
  token's row of the residual stream (a learnt real vector plus spikes: all D entries counted as non-zero), and
  the classifier head (its input is the token mean).
* ``events``: ``nonzero(x) x fan-out`` for every Conv/Linear regardless of the value: what NeuroBench calls
  Effective_ACs + Effective_MACs. It differs from ``acs + macs`` only where residual integers > 1 are weighted.
* **Attention products** (``attention_acs`` / ``attention_macs``, sum = ``attention_ops``): for a product of two
  activations ``A @ B`` the count is the number of non-trivial products, i.e. index triples (i, k, j) with
  ``A[i, k] != 0`` and ``B[k, j] != 0`` (for binary x binary: the pairs of coincident spikes); for an elementwise
  product the number of positions where both operands are non-zero; for a token sum the number of non-zero terms.
  A product is an accumulate (attention_ac) when one operand is in {-1, 0, 1} (then it is an add, a subtract or
  nothing) and a MAC otherwise. So SSA's ``Q K^T`` and ``(Q K^T) V``, SDSA's ``K ⊙ V``, token sum and ``Q ⊙ kv``,
  and A²OS²A's ``K^T V`` (real ReLU K x ternary V) and ``Q (K^T V)`` (binary Q) are all accumulates: A²OS²A is
  addition-only. The constant scale (SSA's 0.125) folds into the threshold and is not counted.
* **Neuron updates**: every neuron of every slot present at a timestep (pruned tokens: none). With timestep-wise
  token sets a token dropped at t but kept at another timestep keeps a decaying membrane (see neurons.py): on
  hardware with a fixed topology that neuron still exists, so it is counted apart as ``idle_neuron_updates``
  (Loihi's "inactive" update). **Spikes**: non-zero outputs (|±1| for ternary neurons; non-zero for the ReLU
  "neuron"). ``firing_rate = spikes / neuron_updates``.
* **Scorers** (dynamic pruning only; static masks need none): a layer ``blocks.{i}.scorer`` holds what the scorer
  computes — STATA/AT: the anchor row ``Q_0 K^T`` per head (attention ACs, recomputed even where SSA's ``Q K^T``
  already holds it), the mean over heads (and over T for AT) as ACs; TP: channel and time means, the temporal
  difference, channel sum and 3x3 box filter (ACs), the cosine and the two softmaxes (MACs, one per multiply,
  divide, square root or exp); l1, SSA-average likewise. The top-k selection is counted as ``compares``
  (``n x ceil(log2(k + 1))`` per selection, a heap-selection estimate). Max-pooling of spikes in the stem is an OR:
  its comparisons are reported (``compares``, 8 per output element) and costed only if a profile says so.
"""
from __future__ import annotations

# The public API of counting (its implementation is the IR's: stata_deploy/ir/count.py, ir/report.py).
from ..ir.count import count_ops  # noqa: F401
from ..ir.report import OP_KINDS, CountError, LayerOps, OpsReport  # noqa: F401
