"""Capture a HF causal LM for training: (input_ids, attention_mask, labels) -> (loss, logits).

The model is exported in train mode, so its dropout stays in the graph, and with labels, so the
loss is HF's own (each model's loss function: label shift, ignore_index -100, mean over the
positions that count) rather than one fxtp writes again. Backward is not captured: the rank graphs
are differentiable as they are (their ATen ops have autograd formulas, and the collectives that
training rank graphs call have their conjugate as backward: fxtp/sharding/training_collectives.py),
so autograd runs the backward of each rank's own forward.
"""
from __future__ import annotations

import torch

from fxtp.capture.export import (Captured, CaptureError, export_model, flatten_model, max_positions, model_device,
                                 model_name)
from fxtp.capture.loop_free import LOOP_OPS
from fxtp.capture.signatures import CAUSAL_LM, signature_of
from fxtp.node_meta import LAYOUT, WANTS
from fxtp.sharding.roles import Role

TRAINING_INPUTS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100  # HF's label for positions that take no part in the loss


class TrainingForward(torch.nn.Module):
    """The model as a function of (input_ids, attention_mask, labels) -> (loss, logits).
    The attribute is named `model`, so state names read "model.<HF name>"."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss, out.logits


def capture_training(model: torch.nn.Module, example_batch: int = 2, example_seq: int = 16) -> Captured:
    """Export `model` (a HF causal LM, real or meta weights) in train mode as a graph of
    TRAINING_INPUTS with dynamic batch and sequence lengths, whose output is (loss, logits)."""
    signature = signature_of(model)
    if signature.kind != CAUSAL_LM:
        raise TypeError(f"training=True supports HF causal LMs for now; {type(model).__name__} is a "
                        f"{signature.kind}: compile it without training=True for inference")
    device = model_device(model)
    example = signature.example_inputs(model, example_batch, example_seq, device)
    labels = example["input_ids"].clone()
    labels[:, 0] = IGNORE_INDEX  # an ignored position, so the graph is general in which positions count
    example["labels"] = labels
    dynamic = signature.dynamic_shapes(4096, max(max_positions(model), example_seq))
    dynamic["labels"] = dynamic["input_ids"]
    ep = export_model(model, TrainingForward(model), (), example, dynamic, " for training",
                      "fxtp needs a model that torch.export (non-strict) can trace in train mode with labels; "
                      "check that model.train(); model(input_ids, attention_mask=..., labels=...) runs.",
                      training=True)
    captured = flatten_model(ep, model, TRAINING_INPUTS, outputs=2)
    recurrences = sorted({LOOP_OPS[n.target] for n in captured.graph_module.graph.nodes if n.target in LOOP_OPS})
    if recurrences:
        raise CaptureError(f"{model_name(model)} has recurrent layers ({', '.join(recurrences)}) "
                           "that fxtp captures as one op with no backward yet: training=True cannot train them; "
                           "compile without training=True for the sharded forward")
    loss = captured.graph_module.graph.output_node().args[0][0]
    if loss is None:
        raise CaptureError(f"{type(model).__name__} returned no loss when given labels: fxtp trains models whose "
                           "forward computes the loss from labels=...")
    return captured


def leave_logits_sharded(gm, groups) -> None:
    """Let a planned training graph return each rank's own logits, unsharded no more than the plan
    made them: the loss needs no gathered logits (vocab-parallel cross entropy), so neither does the
    output. Reads node.meta["fxtp.layout"] of the logits; writes the output node's meta["fxtp.wants"]
    (drops the want that would all-gather them), and the plan's `groups` say so: a column-parallel
    lm_head is no longer gathered."""
    for group in groups:
        if group.role is Role.COLUMN_GATHERED:
            group.role = Role.COLUMN_PARALLEL
    output = gm.graph.output_node()
    logits = output.args[0][1]
    output.meta[WANTS].pop(logits, None)
    output.meta[LAYOUT] = None
