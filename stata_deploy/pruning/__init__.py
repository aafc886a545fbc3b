"""Token sparsification, in the order a pruned model is made: ``scorers`` (token scores and top-k selection),
``alignment`` (STATA's intra/inter attention losses, used by training), ``calibration`` (dynamic top-k frozen into
static masks) and ``masks`` (the one mask format, and the index plans static masks compile to).

Token positions: the block sequence holds ``n_full`` tokens; with an anchor token it sits at position 0 and is
never pruned. Slots always hold tokens in ascending position order.
"""
