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
* **Sums without weights** (token sums and means, channel sums, activity ``|x|.sum(-1)``, the head's token mean):
  one AC per non-zero term, whatever its value. Adding an integer 2 to an accumulator is one add; the value
  weighting above belongs to synaptic layers only, where an input 2 means the weight is accumulated twice (two
  spikes at the same synapses, what spiking hardware does). A real-valued row (the anchor) has all D terms
  non-zero. So SDSA's token sum, TP's means and sums, the scorers' activity and ``head.pool`` count alike.
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
  computes, over the rows the model scores (pruning.scorers: every row of the stream, the anchor's included; top-k
  then skips the fixed rows) — STATA: per timestep the anchor row ``Q_0 K^T`` per head (attention ACs, recomputed
  even where SSA's ``Q K^T`` already holds it), its mean over heads, and the tie-break: the activity ``|x|`` over
  channels of every row (the anchor's D real entries included), ``act / (amax(act) + 1)`` (n - 1 ``compares``
  for the amax, 1 AC for + 1), then divided, scaled and added (3 ACs per row); AT: the same on
  time means, as the model computes it — the score's mean over T, x accumulated over T (one AC per non-zero
  term), then the activity of the mean and the tie-break once, at the last timestep; l1: the activity of every
  row (anchor included) and its mean over T; SSA-average: the sum over queries, the received attention, the means
  over heads and T; TP (image rows only, as the model scores them): channel and time means, the temporal
  difference, channel sum and 3x3 box filter (ACs), the cosine and the two softmaxes (MACs, one per multiply,
  divide, square root or exp). The top-k selection is counted as ``compares`` (``n x ceil(log2(k + 1))`` per
  selection, a heap-selection estimate).
* **Max-pooling** of spikes in the stem is an OR: ``compares`` = (real inputs of the window - 1) per output
  element — padding is never compared, so a 3x3 / padding 1 window costs 8 inside, 5 on an edge, 3 at a corner —
  reported and costed only if a profile says so.
* **Static masks**: a run counted with static masks must have kept exactly the masks' positions at every site and
  timestep (``RunResult.kept``, ascending); any other kept set is a ``CountError`` naming the site, the timestep and
  the sample — the counts would describe a network the run did not compute.
"""
from __future__ import annotations

# The public API of counting (its implementation is the IR's: stata_deploy/ir/count.py, ir/report.py).
from ..ir.count import count_ops  # noqa: F401
from ..ir.report import OP_KINDS, CountError, LayerOps, OpsReport  # noqa: F401
