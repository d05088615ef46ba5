"""Building the executorch target's program: the Decoder exported, lowered to XNNPACK and written as a .pte
(in a process of its own, see converters/executorch.py), and what the written program holds."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def build_program_no_grad(*args) -> dict:
    """`build_program` without autograd, and the peak RSS of the process that ran it."""
    import torch

    with torch.no_grad():
        facts = build_program(*args)
    return {**facts, "peak_rss_mb": round(peak_rss_mb(), 1)}


def build_program(model_dir: Path, path: Path, max_seq_len: int, quant: str, moe_lowering: str,
                  metadata: dict) -> dict:
    """Write the .pte for `model_dir` to `path`; return facts about how it was built."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    from converters.executorch_model import Decoder
    from d2m_export.sources.lazy_weights import release_memory
    from d2m_export.sources.models import load_model

    # the experts are lowered first (in the Decoder), then the rest
    with lowering_without_copies(path.parent / ".constants"):
        model, _, _ = load_model(model_dir)      # as stored: the Decoder upcasts it a layer at a time
        t0 = time.time()
        decoder = Decoder(model, max_seq_len, lowering=moe_lowering, quant=quant).eval()
        moe = [layer.mlp for layer in decoder.layers if layer.is_moe]
        moe_facts = None if not moe else {
            "layers": [i for i, layer in enumerate(decoder.layers) if layer.is_moe],
            "num_experts": moe[0].num_experts, "top_k": moe[0].top_k,
            "distinct_experts_per_layer": [len(set(m.expert_of)) for m in moe], "lowering": moe_lowering,
            "decode_leaves_expected": sum(m.top_k * m.num_experts for m in moe)}
        quant_kept = decoder.quant_skipped + (["routers", "shared_expert_gate"] if moe else [])
        del model, moe
        t1 = time.time()
        example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        dynamic = ({1: Dim("seq_len", min=1, max=max_seq_len)}, None)
        program = export(decoder, example, dynamic_shapes=dynamic, strict=False)
        del decoder                 # the exported program holds the weights now
        t2 = time.time()
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata)
        del program                 # lowered: the delegates hold the weights now (in files)
        release_memory()
        t3 = time.time()
        et = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
        structure = branch_structure(edge.exported_program().graph_module)
        del edge
        with open(path, "wb") as f:
            et.write_to_file(f)     # piece by piece: `et.buffer` would join the whole program in memory
        del et
    if moe_facts:
        # sparse: every decode-tree leaf is a branch that runs exactly one expert delegate
        leaves = moe_facts.pop("decode_leaves_expected")
        structure["decode_leaves_expected"] = leaves
        structure["sparse"] = moe_lowering == "cond" and structure["single_delegate_branches"] >= leaves
        moe_facts["structure"] = structure
    facts = {
        "wall_s": {"build_and_lower_experts": round(t1 - t0, 1), "torch_export": round(t2 - t1, 1),
                   "to_edge_and_lower": round(t3 - t2, 1), "to_executorch": round(time.time() - t3, 1)},
        "quant_kept_fp32": quant_kept, "moe": moe_facts,
    }
    return facts


@contextlib.contextmanager
def lowering_without_copies(directory: Path, min_bytes: int = 1 << 16):
    """Lower with one copy of the weights in memory, where ExecuTorch's lowering would hold three.

    - Before preprocessing, ExecuTorch deep-copies every partition's program, weights included, and
      keeps all the copies until every partition is done. The copy here shares the weight tensors
      (XNNPACK's preprocess reads them and never writes them).
    - XNNPACK then copies every weight into a bytes object in a NamedDataStore, held until the
      program is written. Here each constant of `min_bytes` or more goes to a file under
      `directory` as it is made, as a `FileBackedData` (what ExecuTorch's CUDA backend uses), which
      the serializer streams into the .pte. The files are deleted after.
    """
    import copy
    import hashlib
    import shutil
    import tempfile

    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    from d2m_export.sources.lazy_weights import release_memory

    add, own_copy = NamedDataStore.add_named_data, XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")

    def add_on_disk(self, key, data, alignment=1, external_tag=None, tensor_layout=None):
        if isinstance(data, (bytes, bytearray)) and len(data) >= min_bytes:
            fd, name = tempfile.mkstemp(dir=directory, suffix=".bin")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            data = FileBackedData(name, cleanup=True, sha256=hashlib.sha256(data).digest())
        return add(self, key, data, alignment, external_tag, tensor_layout)

    def copy_sharing_weights(cls, edge_program, compile_specs):
        tensors = [*edge_program.state_dict.values(), *edge_program.constants.values()]
        return copy.deepcopy(edge_program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})

    directory.mkdir(parents=True, exist_ok=True)
    NamedDataStore.add_named_data = add_on_disk
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_weights)
    try:
        yield
    finally:
        NamedDataStore.add_named_data = add
        if own_copy is None:
            del XnnpackBackend.copy_exported_program_for_preprocess      # BackendDetails' again
        else:
            XnnpackBackend.copy_exported_program_for_preprocess = own_copy
        release_memory()            # the last FileBackedData references, whose finalizers delete the files
        shutil.rmtree(directory, ignore_errors=True)


def branch_structure(gm) -> dict:
    """What the lowered graph does inside `cond` branches: how many conds, how many delegate calls
    sit inside branches (the experts), and how many branches run exactly one delegate and nothing
    else (the leaves of the expert trees)."""
    import torch

    def is_delegate(node):
        return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"

    counts = {"conds": 0, "expert_call_sites": 0, "single_delegate_branches": 0}

    def walk(module, in_branch: bool):
        for node in module.graph.nodes:
            if is_delegate(node) and in_branch:
                counts["expert_call_sites"] += 1
            if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
                counts["conds"] += 1
                for branch in node.args[1:3]:
                    sub = getattr(module, branch.target)
                    compute = [n for n in sub.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
                    if len(compute) == 1 and is_delegate(compute[0]):
                        counts["single_delegate_branches"] += 1
                    walk(sub, True)

    walk(gm, False)
    return counts


def program_summary(path: Path) -> dict:
    """Per method of a .pte: instructions by kind (DelegateCall, KernelCall, JumpFalseCall, ...),
    delegates by backend, operators, or the constant a metadata method returns."""
    from collections import Counter

    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header

    # The flatbuffer only: the segments that follow it (weights, delegate blobs) are most of the file,
    # and deserializing them too costs several times the file in memory.
    with open(path, "rb") as f:
        header = _get_extended_header(f.read(64))
        f.seek(0)
        program = _flatbuffer_to_program(f.read(header.program_size if header and header.is_valid() else -1))
    out = {}
    for plan in program.execution_plan:
        instructions = Counter(type(i.instr_args).__name__ for chain in plan.chains for i in chain.instructions)
        if not instructions and not plan.inputs:         # a constant method: its outputs are the values
            values = [plan.values[i].val for i in plan.outputs]
            values = [getattr(v, "int_val", getattr(v, "bool_val", getattr(v, "double_val", None))) for v in values]
            out[plan.name] = {"constant": values if plan.name == "get_eos_ids" or len(values) != 1 else values[0]}
            continue
        out[plan.name] = {
            "instructions": dict(instructions),
            "delegates": dict(Counter(d.id for d in plan.delegates)),
            "operators": sorted(f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators),
        }
    blobs = {(str(d.processed.location), d.processed.index) for plan in program.execution_plan for d in plan.delegates}
    out["distinct_delegate_blobs"] = len(blobs)     # identical blobs are stored once
    return out
