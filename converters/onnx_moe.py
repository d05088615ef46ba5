"""MoE layers in ONNX: the routed experts of a Qwen2-MoE sparse block, lowered one of several ways
(`LOWERINGS`; see `converters.onnx_graph` for what each costs), plus the shared expert beside them."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from converters.onnx_ops import Graph, Linears, Spec, interleave_gate_up

LOWERINGS = ("sparse", "switch", "gather", "dense")


def moe_block(g: Graph, lin: Linears, spec: Spec, sd: dict, m: str, x: str, name: str, mlp,
              lowering: str = "sparse") -> str:
    """Qwen2-MoE sparse block: routed experts as `lowering` says, plus the (gated) shared expert beside them."""
    router_w = sd[m + "gate.weight"]                      # [E, H]
    num_experts = router_w.shape[0]
    logits = g.op("MatMul", [x, g.const(f"{name}.router.weight_t", router_w.T.astype(np.float32))], f"{name}.router")
    if lowering == "switch":            # routes [batch, seq, E] logits as they are: fewer nodes per decode step
        routed = switched_experts(g, lin, x, logits, sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"],
                                  spec.moe_top_k, spec.norm_topk_prob, f"{name}.experts")
        return with_shared_expert(g, sd, m, x, name, mlp, routed)
    logits_2d = g.op("Reshape", [logits, g.const(f"{name}.router_shape", np.array([-1, num_experts], np.int64))],
                     f"{name}.router_2d")
    if lowering == "gather":
        routed = gathered_experts(g, lin, x, logits_2d, sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"],
                                  spec.moe_top_k, spec.norm_topk_prob, f"{name}.experts")
    elif lowering == "dense":
        routed = dense_mask_experts(g, x, logits_2d, sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"],
                                    spec.moe_top_k, spec.norm_topk_prob, f"{name}.experts")
    else:
        routed = lin.moe(x, logits_2d, interleave_gate_up(sd[m + "experts.gate_up_proj"]),
                         sd[m + "experts.down_proj"], spec.moe_top_k, spec.norm_topk_prob, f"{name}.experts")
    return with_shared_expert(g, sd, m, x, name, mlp, routed)


def with_shared_expert(g: Graph, sd: dict, m: str, x: str, name: str, mlp, routed: str) -> str:
    """The routed experts' output plus the block's (gated) shared expert, where it has one."""
    shared_width = sd.get(m + "shared_expert.gate_proj.weight", np.zeros((0, 1))).shape[0]
    if shared_width == 0:
        return routed
    gate_w = sd[m + "shared_expert_gate.weight"]          # [1, H]
    if not gate_w.any():                                  # sigmoid(0) = 0.5, folded into the down-projection
        shared = mlp(x, m + "shared_expert.", f"{name}.shared", down_scale=0.5)
    else:
        shared = g.op("Mul", [mlp(x, m + "shared_expert.", f"{name}.shared"),
                              g.op("Sigmoid", [g.op("MatMul", [x, g.const(f"{name}.shared_gate.weight_t",
                                                                         gate_w.T.astype(np.float32))],
                                                    f"{name}.shared_gate")], f"{name}.shared_gate_sigmoid")],
                      f"{name}.shared_gated")
    return g.op("Add", [routed, shared], f"{name}.sum")


def gathered_experts(g: Graph, lin: Linears, x: str, logits_2d: str, gate_up: np.ndarray, down: np.ndarray,
                     k: int, normalize: bool, name: str) -> str:
    """Each expert on the rows of the tokens that chose it. gate_up [E, 2I, H] (gate rows then up rows),
    down [E, H, I]. Top-1 renormalised (LF-UC's routed host) needs no weights at all: ArgMax picks the
    expert and its weight is 1; otherwise softmax -> top-k (-> renormalise) gives each row its weight."""
    e, two_i, h = gate_up.shape
    i = two_i // 2
    x2d = g.op("Reshape", [x, g.const(f"{name}.x_shape", np.array([-1, h], np.int64))], f"{name}.x_2d")
    out = g.op("Mul", [x2d, g.const(f"{name}.zero", np.array(0, np.float32))], f"{name}.zeros")
    unweighted = k == 1 and normalize
    if unweighted:
        choice = g.op("ArgMax", [logits_2d], f"{name}.argmax", axis=1, keepdims=0)              # [T]
    else:
        probs = g.op("Softmax", [logits_2d], f"{name}.softmax", axis=-1)
        top, idx = g.op("TopK", [probs, g.const(f"{name}.k", np.array([k], np.int64))], f"{name}.topk", outputs=2,
                        axis=-1)
        if normalize:
            top = g.op("Div", [top, g.op("ReduceSum", [top, g.const(f"{name}.axes", np.array([-1], np.int64))],
                                         f"{name}.topk_sum", keepdims=1)], f"{name}.topk_norm")
    for j in range(e):
        expert = g.const(f"{name}.{j}.id", np.array(j, np.int64))
        if unweighted:
            chosen = g.op("Equal", [choice, expert], f"{name}.{j}.chosen")
        else:                                     # this expert's routing weight per token, 0 where not chosen
            weight = g.op("ReduceSum", [g.op("Where", [g.op("Equal", [idx, expert], f"{name}.{j}.hit"), top,
                                                       g.const(f"{name}.{j}.none", np.array(0, np.float32))],
                                             f"{name}.{j}.hit_weight"),
                                        g.const(f"{name}.{j}.axis", np.array([1], np.int64))],
                          f"{name}.{j}.weight", keepdims=0)                                   # [T]
            chosen = g.op("Greater", [weight, g.const(f"{name}.{j}.zero", np.array(0, np.float32))], f"{name}.{j}.chosen")
        rows = g.op("Transpose", [g.op("NonZero", [chosen], f"{name}.{j}.nonzero")], f"{name}.{j}.rows", perm=[1, 0])
        y = lin.swiglu(g.op("GatherND", [x2d, rows], f"{name}.{j}.x"), gate_up[j, :i], gate_up[j, i:], down[j],
                       f"{name}.{j}")
        if not unweighted:
            y = g.op("Mul", [y, g.op("Unsqueeze", [g.op("GatherND", [weight, rows], f"{name}.{j}.row_weight"),
                                                   g.const(f"{name}.{j}.axis_1", np.array([1], np.int64))],
                                     f"{name}.{j}.row_weight_2d")], f"{name}.{j}.weighted")
        # with top-1 each token's row is written once; with top-k it collects k experts' contributions
        out = g.op("ScatterND", [out, rows, y], f"{name}.{j}.scatter", **({"reduction": "add"} if k > 1 else {}))
    return g.op("Reshape", [out, g.op("Shape", [x], f"{name}.x_shape_of")], f"{name}.out")


def dense_mask_experts(g: Graph, x: str, logits_2d: str, gate_up: np.ndarray, down: np.ndarray, k: int,
                       normalize: bool, name: str) -> str:
    """Every expert on every token, weighted by softmax -> top-k (-> renormalise) scattered into a zero
    mask. gate_up [E, 2I, H] (gate rows then up rows), down [E, H, I]."""
    e, two_i, h = gate_up.shape
    i = two_i // 2
    weights = routing_weights(g, logits_2d, k, normalize, name)                                # [T, E]
    x2d = g.op("Reshape", [x, g.const(f"{name}.x_shape", np.array([-1, h], np.int64))], f"{name}.x_2d")
    gu = g.op("MatMul", [x2d, g.const(f"{name}.gate_up_t", gate_up.reshape(e * two_i, h).T.astype(np.float32))],
              f"{name}.gate_up")
    gu = g.op("Reshape", [gu, g.const(f"{name}.gu_shape", np.array([-1, e, 2, i], np.int64))], f"{name}.gu_4d")
    gate, up = g.op("Split", [gu], f"{name}.split", outputs=2, axis=2, num_outputs=2)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{name}.sigmoid")], f"{name}.silu"), up],
               f"{name}.act")                                                                # [T, E, 1, I]
    act = g.op("Mul", [g.op("Reshape", [act, g.const(f"{name}.act_shape", np.array([-1, e, i], np.int64))],
                            f"{name}.act_3d"),
                       g.op("Unsqueeze", [weights, g.const(f"{name}.axis2", np.array([2], np.int64))],
                            f"{name}.mask_3d")], f"{name}.weighted")
    act = g.op("Reshape", [act, g.const(f"{name}.flat_shape", np.array([-1, e * i], np.int64))], f"{name}.act_2d")
    out = g.op("MatMul", [act, g.const(f"{name}.down_t", down.transpose(0, 2, 1).reshape(e * i, h).astype(np.float32))],
               f"{name}.down")
    return g.op("Reshape", [out, g.op("Shape", [x], f"{name}.x_shape_of")], f"{name}.out")


def routing_weights(g: Graph, logits: str, k: int, normalize: bool, name: str) -> str:
    """[..., E]: each token's routing weight per expert, zero outside its top-k: softmax -> top-k
    (-> renormalise) scattered into zeros."""
    probs = g.op("Softmax", [logits], f"{name}.softmax", axis=-1)
    top, idx = g.op("TopK", [probs, g.const(f"{name}.k", np.array([k], np.int64))], f"{name}.topk", outputs=2, axis=-1)
    if normalize:
        top = g.op("Div", [top, g.op("ReduceSum", [top, g.const(f"{name}.axes", np.array([-1], np.int64))],
                                     f"{name}.topk_sum", keepdims=1)], f"{name}.topk_norm")
    return g.op("ScatterElements", [g.op("Mul", [probs, g.const(f"{name}.zero", np.array(0, np.float32))],
                                         f"{name}.zeros"), idx, top], f"{name}.mask", axis=-1)


def distinct_experts(gate_up: np.ndarray, down: np.ndarray) -> list[list[int]]:
    """The experts grouped by identical weights (LF-UC replicates a block's MLPs up to N experts), in
    order of first appearance."""
    groups: dict[bytes, list[int]] = {}
    for j in range(len(gate_up)):
        key = hashlib.sha1(gate_up[j].tobytes() + down[j].tobytes()).digest()
        groups.setdefault(key, []).append(j)
    return list(groups.values())


def switched_experts(g: Graph, lin: Linears, x: str, logits: str, gate_up: np.ndarray, down: np.ndarray,
                     k: int, normalize: bool, name: str) -> str:
    """Each distinct expert in an `If` whose branch holds that expert's weights as its own initializers, so
    ONNX Runtime prepacks them (it prepacks only a graph's own initializers and its parent's) and a branch
    runs only when some token of the step chose its expert: a one-token decode step reads the weights of
    its top-k experts and no others, through the same MatMul / MatMulNBits kernels as a dense MLP. A branch
    runs its expert on every row of the step and weights each row by its routing weight (zero for the
    rows that chose other experts), so a prompt is exact too. x [B, S, H], logits [B, S, E],
    gate_up [E, 2I, H], down [E, H, I]. Per step: 6 nodes + one `If` per distinct expert."""
    e, two_i, _ = gate_up.shape
    i = two_i // 2
    groups = distinct_experts(gate_up, down)
    if k == 1 and normalize:            # top-1 renormalised: weight 1 on the argmax, no softmax needed
        weights = g.op("OneHot", [g.op("ArgMax", [logits], f"{name}.argmax", axis=-1, keepdims=0),
                                  g.const(f"{name}.depth", np.array(e, np.int64)),
                                  g.const(f"{name}.off_on", np.array([0, 1], np.float32))], f"{name}.onehot", axis=-1)
    else:
        weights = routing_weights(g, logits, k, normalize, name)
    if len(groups) < e:                 # copies of one expert: their weights add up
        assign = np.zeros((e, len(groups)), np.float32)
        for d, members in enumerate(groups):
            assign[members, d] = 1
        weights = g.op("MatMul", [weights, g.const(f"{name}.copies", assign)], f"{name}.distinct_weights")
    chosen = g.op("Greater", [g.op("ReduceMax", [weights, g.const(f"{name}.rows", np.array([0, 1], np.int64))],
                                   f"{name}.max_weight", keepdims=0),
                              g.const(f"{name}.none", np.array(0, np.float32))], f"{name}.chosen")       # [D]
    conds = g.op("Split", [chosen], f"{name}.conds", outputs=len(groups), axis=0, num_outputs=len(groups)) \
        if len(groups) > 1 else [chosen]
    terms = []
    for d, (members, cond) in enumerate(zip(groups, conds)):
        j = members[0]
        branch = Graph(names=g.names, data=None if g.inline_branches else g.data)
        sub = copy.copy(lin)
        sub.g = branch
        y = sub.swiglu(x, gate_up[j, :i], gate_up[j, i:], down[j], f"{name}.{d}")
        row_weight = branch.op("Gather", [weights, g.const(f"{name}.{d}.id", np.array([d], np.int64))],
                               f"{name}.{d}.weight", axis=-1)                                        # [B, S, 1]
        y = branch.op("Mul", [y, row_weight], f"{name}.{d}.weighted")
        zero = g.fresh(f"{name}.{d}.skipped")
        skip = helper.make_graph([helper.make_node("Constant", [], [zero], name=zero,
                                                   value=numpy_helper.from_array(np.zeros((1, 1, 1), np.float32)))],
                                 f"{name}.{d}.else", [], [helper.make_tensor_value_info(zero, TensorProto.FLOAT, None)])
        run = helper.make_graph(branch.nodes, f"{name}.{d}.then", [],
                                [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], branch.initializers)
        terms.append(g.op("If", [cond], f"{name}.{d}.if", then_branch=run, else_branch=skip))
    return g.op("Sum", terms, f"{name}.sum") if len(terms) > 1 else terms[0]
