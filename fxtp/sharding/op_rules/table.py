"""The one table of layout rules, keyed by ATen overload (or by op_name for ops fxtp does not import),
and the lookup propagation and rewrite share. Each rule's docstring, in its family's file, says what it
decides; a comment here says why where the choice of rule is not obvious."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxtp.sharding.op_rules.along_dim import along_dim, triangle
from fxtp.sharding.op_rules.attention import sdpa
from fxtp.sharding.op_rules.channels import chunk_gated_delta_rule, depthwise_convolution, localize_groups, selective_scan
from fxtp.sharding.op_rules.contractions import GROUPED, GROUPED_MM_FALLBACK, LINEAR, baddbmm, einsum, matmul, projection
from fxtp.sharding.op_rules.cross_entropy import cross_entropy, lower_cross_entropy
from fxtp.sharding.op_rules.dropout import lower_attention, lower_dropout
from fxtp.sharding.op_rules.cut_and_join import cat, cut_blocks, localize_cut, pad, stack
from fxtp.sharding.op_rules.factories import fresh, like
from fxtp.sharding.op_rules.helpers import op_name, replicate_all, val
from fxtp.sharding.op_rules.indexing import copy_into, embedding, index, index_add, index_copy, vocab_parallel
from fxtp.sharding.op_rules.on_rank import joining, localize_join, localize_select, rank_local, reads_on_rank, select_one
from fxtp.sharding.op_rules.pointwise import cast, pointwise
from fxtp.sharding.op_rules.reductions import mean_as_partial, norm, reduction
from fxtp.sharding.op_rules.repeats import localize_output_size, repeat, repeat_interleave
from fxtp.sharding.op_rules.rule import LayoutOf, OpRule
from fxtp.sharding.op_rules.structural import getitem, no_output, sym_size
from fxtp.sharding.op_rules.views import (complex_view, expand, expand_as, localize_shape_list, localize_unflatten,
                                          permute, reshape)

aten = torch.ops.aten

UNARY_LINEAR = OpRule(pointwise("unary"))  # f(sum) = sum f: a Partial passes
SUM = OpRule(pointwise("sum"))             # Partials added to Partials stay Partial
SCALE = OpRule(pointwise("scale"))         # one Partial times (or over) replicated values stays Partial
ELEMENTWISE = OpRule(pointwise("none"))    # nonlinear: a Partial is reduced first
CAST = OpRule(cast)
RESHAPE = OpRule(reshape)
RESHAPE_TO_SIZES = OpRule(reshape, localize_shape_list(1))
EXPAND = OpRule(expand, localize_shape_list(1))
PERMUTE = OpRule(permute)
CUT = OpRule(cut_blocks, localize_cut)
SOFTMAX = OpRule(along_dim(1, keeps_partial=False))
FRESH = OpRule(fresh)
LIKE = OpRule(like)

RULES: dict[object, OpRule] = {
    # pointwise
    aten.neg.default: UNARY_LINEAR,
    aten.alias.default: UNARY_LINEAR,
    aten.clone.default: UNARY_LINEAR,
    aten.contiguous.default: UNARY_LINEAR,
    aten.detach.default: UNARY_LINEAR,
    aten.detach_.default: UNARY_LINEAR,
    aten.lift_fresh_copy.default: UNARY_LINEAR,
    # a dropout left in the graph is one of training (fxtp/capture/training.py): linear for a fixed mask
    aten.dropout.default: OpRule(pointwise("unary"), lower=lower_dropout),
    aten.add.Tensor: SUM,
    aten.sub.Tensor: SUM,
    aten.add_.Tensor: SUM,
    aten.mul.Tensor: SCALE,
    aten.multiply.Tensor: SCALE,  # mul's alias, which export keeps
    aten.div.Tensor: SCALE,
    aten.div_.Tensor: SCALE,
    aten.silu.default: ELEMENTWISE,
    aten.gelu.default: ELEMENTWISE,
    aten.relu.default: ELEMENTWISE,
    aten.tanh.default: ELEMENTWISE,
    aten.sigmoid.default: ELEMENTWISE,
    aten.rsqrt.default: ELEMENTWISE,
    aten.sqrt.default: ELEMENTWISE,
    aten.reciprocal.default: ELEMENTWISE,
    aten.exp.default: ELEMENTWISE,
    aten.log.default: ELEMENTWISE,
    aten.cos.default: ELEMENTWISE,
    aten.sin.default: ELEMENTWISE,
    aten.square.default: ELEMENTWISE,
    aten.abs.default: ELEMENTWISE,
    aten.expm1.default: ELEMENTWISE,
    aten.log1p.default: ELEMENTWISE,
    aten.erf.default: ELEMENTWISE,
    aten.softplus.default: ELEMENTWISE,
    aten.elu.default: ELEMENTWISE,
    aten.celu.default: ELEMENTWISE,
    aten.selu.default: ELEMENTWISE,
    aten.leaky_relu.default: ELEMENTWISE,
    aten.hardtanh.default: ELEMENTWISE,
    aten.relu6.default: ELEMENTWISE,
    aten.hardsigmoid.default: ELEMENTWISE,
    aten.hardswish.default: ELEMENTWISE,
    aten.mish.default: ELEMENTWISE,
    aten.sign.default: ELEMENTWISE,
    aten.sgn.default: ELEMENTWISE,
    aten.floor.default: ELEMENTWISE,
    aten.ceil.default: ELEMENTWISE,
    aten.round.default: ELEMENTWISE,
    aten.trunc.default: ELEMENTWISE,
    aten.clamp_min.default: ELEMENTWISE,
    aten.clamp_max.default: ELEMENTWISE,
    aten.atan.default: ELEMENTWISE,
    aten.log2.default: ELEMENTWISE,
    aten.exp2.default: ELEMENTWISE,
    aten.sinh.default: ELEMENTWISE,
    aten.cosh.default: ELEMENTWISE,
    aten.isnan.default: ELEMENTWISE,
    aten.isinf.default: ELEMENTWISE,
    aten.pow.Tensor_Scalar: ELEMENTWISE,
    aten.pow.Tensor_Tensor: ELEMENTWISE,
    aten.pow.Scalar: ELEMENTWISE,
    aten.clamp.default: ELEMENTWISE,
    aten.mul.Scalar: ELEMENTWISE,
    aten.add.Scalar: ELEMENTWISE,  # on a Partial every rank would add c: the sum needs it once
    aten.__and__.Tensor: ELEMENTWISE,
    aten.__or__.Tensor: ELEMENTWISE,
    aten.bitwise_not.default: ELEMENTWISE,
    aten.logical_not.default: ELEMENTWISE,
    aten.le.Tensor: ELEMENTWISE,
    aten.lt.Tensor: ELEMENTWISE,
    aten.ge.Tensor: ELEMENTWISE,
    aten.gt.Tensor: ELEMENTWISE,
    aten.eq.Tensor: ELEMENTWISE,
    aten.ne.Tensor: ELEMENTWISE,
    aten.le.Scalar: ELEMENTWISE,
    aten.lt.Scalar: ELEMENTWISE,
    aten.ge.Scalar: ELEMENTWISE,
    aten.gt.Scalar: ELEMENTWISE,
    aten.eq.Scalar: ELEMENTWISE,
    aten.ne.Scalar: ELEMENTWISE,
    aten.max.other: ELEMENTWISE,
    aten.min.other: ELEMENTWISE,
    aten.maximum.default: ELEMENTWISE,
    aten.minimum.default: ELEMENTWISE,
    aten.floor_divide.default: ELEMENTWISE,
    aten.remainder.Scalar: ELEMENTWISE,
    aten.where.self: ELEMENTWISE,
    aten.where.ScalarOther: ELEMENTWISE,
    aten.where.ScalarSelf: ELEMENTWISE,
    aten.masked_fill.Tensor: ELEMENTWISE,
    aten.masked_fill.Scalar: OpRule(pointwise("zero_fill")),  # MoE zeroes unrouted rows of a Partial
    aten.masked_fill_.Scalar: OpRule(pointwise("zero_fill")),  # XLM masks its scores in place
    aten.masked_fill_.Tensor: ELEMENTWISE,
    # casts
    aten.to.dtype: CAST,
    aten.to.device: CAST,
    aten.to.dtype_layout: CAST,
    aten._to_copy.default: CAST,
    aten.type_as.default: CAST,
    # views
    aten.view.default: RESHAPE_TO_SIZES,
    aten.reshape.default: RESHAPE_TO_SIZES,
    aten._unsafe_view.default: RESHAPE_TO_SIZES,
    aten.flatten.using_ints: RESHAPE,
    aten.unflatten.int: OpRule(reshape, localize_unflatten),
    aten.squeeze.dim: RESHAPE,
    aten.squeeze.dims: RESHAPE,
    aten.unsqueeze.default: RESHAPE,
    aten.expand.default: EXPAND,
    aten.broadcast_to.default: EXPAND,
    aten.expand_as.default: OpRule(expand_as),
    aten.transpose.int: PERMUTE,
    aten.permute.default: PERMUTE,
    aten.t.default: PERMUTE,
    aten.numpy_T.default: PERMUTE,
    aten.view_as_complex.default: OpRule(complex_view),
    aten.view_as_real.default: OpRule(complex_view),
    aten.select.int: OpRule(select_one, localize_select),  # one head of a head shard: on its rank alone
    aten.unbind.int: OpRule(along_dim(1, removes_dim=True, tuple_out=True)),
    aten.index_select.default: OpRule(along_dim(1)),
    # repeats
    aten.repeat_interleave.self_int: OpRule(repeat_interleave, localize_output_size),  # GQA kv heads, MoE rows
    aten.repeat.default: OpRule(repeat),
    # cuts and joins
    aten.slice.Tensor: CUT,
    aten.split.Tensor: CUT,
    aten.split_with_sizes.default: CUT,
    aten.chunk.default: CUT,
    aten.tensor_split.indices: OpRule(along_dim(2, tuple_out=True)),  # Mamba's scan splits the sequence
    aten.cat.default: OpRule(joining(cat), localize_join),  # joins heads on their ranks into a head shard
    aten.stack.default: OpRule(joining(stack), localize_join),
    aten.pad.default: OpRule(pad),
    aten.constant_pad_nd.default: OpRule(pad),
    # reductions and normalizations along one dim
    aten.softmax.int: SOFTMAX,
    aten._softmax.default: SOFTMAX,
    aten.log_softmax.int: SOFTMAX,
    aten.cumsum.default: OpRule(along_dim(1)),
    aten.tril.default: OpRule(triangle),
    aten.triu.default: OpRule(triangle),
    aten.topk.default: OpRule(along_dim(2, tuple_out=True, keeps_partial=False, default_dim=-1)),
    aten.sort.default: OpRule(along_dim(1, tuple_out=True, keeps_partial=False, default_dim=-1)),
    aten.sum.dim_IntList: OpRule(reduction("sum")),
    aten.mean.dim: OpRule(reduction("mean"), lower=mean_as_partial),  # over the sharded dim: local sum / global count
    aten.amax.default: OpRule(reduction("amax")),
    aten.logsumexp.default: OpRule(reduction("logsumexp")),  # attention sinks' normalizer (Granite's sliding window)
    aten.max.dim: OpRule(reduction("max")),  # GPT-OSS attention: the row max beside the sinks
    aten.min.dim: OpRule(reduction("min")),
    aten.layer_norm.default: OpRule(norm),
    aten.rms_norm.default: OpRule(norm),
    # contractions
    aten.linear.default: OpRule(projection(LINEAR)),
    aten._grouped_mm.default: OpRule(projection(GROUPED)),  # MoE experts: column/row-parallel per expert
    GROUPED_MM_FALLBACK: OpRule(projection(GROUPED)),  # transformers' grouped mm on CPU, by op_name
    aten.matmul.default: OpRule(matmul),
    aten.mm.default: OpRule(matmul),
    aten.bmm.default: OpRule(matmul),
    aten.baddbmm.default: OpRule(baddbmm),
    aten.einsum.default: OpRule(einsum),
    # per channel: Mamba's causal conv and its scan, the gated delta rule per head (fxtp/rank_ops/, by op_name)
    aten.conv1d.default: OpRule(depthwise_convolution, localize_groups),
    aten.conv2d.default: OpRule(depthwise_convolution, localize_groups),
    "fxtp::selective_scan": OpRule(selective_scan),
    "fxtp::chunk_gated_delta_rule": OpRule(chunk_gated_delta_rule),
    # the loss of a training graph: over a vocab-parallel lm_head's logits without gathering them
    aten.cross_entropy_loss.default: OpRule(cross_entropy, lower=lower_cross_entropy),
    # attention
    aten.scaled_dot_product_attention.default: OpRule(sdpa, lower=lower_attention),  # dropout: as dropout's
    # lookups and indexed writes
    aten.embedding.default: OpRule(embedding, lower=vocab_parallel),  # a vocab-sharded table masks ids it lacks
    aten.index.Tensor: OpRule(index),  # MoE token gathers: a Partial passes through
    aten.index_copy.default: OpRule(index_copy),
    aten.index_copy_.default: OpRule(index_copy),  # static KV cache updates
    aten.copy_.default: OpRule(copy_into),  # rows written into a buffer (the gated delta rule's chunk loop)
    aten.index_add.default: OpRule(index_add),  # JetMoE: expert outputs added back in token order
    # factories
    aten.arange.default: FRESH,
    aten.arange.start: FRESH,
    aten.arange.start_step: FRESH,
    aten.zeros.default: FRESH,
    aten.ones.default: FRESH,
    aten.full.default: FRESH,
    aten.empty.memory_format: FRESH,
    aten.scalar_tensor.default: FRESH,
    aten.new_ones.default: FRESH,
    aten.new_zeros.default: FRESH,
    aten.new_empty.default: FRESH,
    aten.new_full.default: FRESH,
    aten.zeros_like.default: LIKE,
    aten.ones_like.default: LIKE,
    aten.empty_like.default: LIKE,
    aten.full_like.default: LIKE,
    # bookkeeping
    aten._assert_tensor_metadata.default: OpRule(no_output),
    aten.sym_size.int: OpRule(sym_size),
    operator.getitem: OpRule(getitem),
}


RANK_LOCAL = OpRule(rank_local)


def rule_under(node: fx.Node, lay: LayoutOf) -> OpRule:
    """The rule deciding `node` under the layouts `lay` gives its inputs: rank_local where it reads a
    value held on one rank alone (but for the joins, whose rules make a shard of such values), else
    the table's (rule_for)."""
    return RANK_LOCAL if reads_on_rank(node, lay) else rule_for(node)


def rule_for(node: fx.Node) -> OpRule:
    rule = RULES.get(node.target) or RULES.get(op_name(node.target))
    if rule is not None:
        return rule
    if not any(isinstance(val(n), torch.Tensor) for n in node.all_input_nodes) and not isinstance(val(node), torch.Tensor):
        return OpRule(no_output)  # symbolic-int arithmetic (operator.mul, sym_max, ...)
    return OpRule(replicate_all)
