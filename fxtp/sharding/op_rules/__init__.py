"""Layout propagation rules, one table keyed by ATen overload (table.py).

A rule sees a node and the layouts of its inputs and returns a `Decision` (rule.py): the output
layout and, for inputs whose layout must change first, the layout it needs (`wants`). The
propagate pass turns a want into a redistribution: R->S is a free local slice, P->R an
all_reduce, S->R an all_gather. A rule may also have a `localize` that rewrites the node's
constant arguments for one rank (a head count in a view becomes the rank's local head count), or
a `lower` that computes the node with another function on each rank (a vocab-sharded embedding
masks the ids its rows do not hold).

Ops without a rule fall back to `replicate_all` (helpers.py): every input is made Replicate
first, which is always correct, and the dump reports it.

One file per op family: pointwise.py, views.py, along_dim.py (ops acting along one dim),
cut_and_join.py (split/slice/chunk, cat/stack), reductions.py (and norms), contractions.py,
attention.py, indexing.py (embedding, index, index_copy), factories.py, structural.py
(getitem, sym_size, asserts); helpers.py holds what they share.
"""
