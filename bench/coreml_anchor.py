"""The Core ML anchor of bench/export_time.py: coremltools' documented conversion flow, as a user writes it
for a Hugging Face causal LM (coremltools ships no converter for one).

    python bench/coreml_anchor.py MODEL_DIR OUT.mlpackage [--quant int4|int8|fp16] [--max-seq-len N]
                                  [--dtype float32|float16]

The steps are the ones coremltools documents for PyTorch models and weight compression: load the model
with transformers, `torch.jit.trace` it, `ct.convert` to an ML Program (iOS 18, fp16 compute, a flexible
sequence length), `ct.optimize.coreml.linear_quantize_weights` (int4: symmetric, blocks of 32 inputs, the
same scheme as d2m-export's int4; int8: per output channel), then `save`. It traces the model without a KV
cache (input_ids and a causal mask -> logits for every position; the mask is an input, as in Apple's
Llama-on-Core-ML example, because transformers' own mask building uses ops coremltools cannot convert): the
shortest flow that gives a working package, less work than d2m-export's stateful, cached one, so a ratio
against it favours the anchor. No parity check. Each step's wall time is printed as JSON on the last line.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


def scalar_casts_for_numpy2() -> None:
    """coremltools 9's torch frontend casts a traced shape value with `int(array)`, which numpy >= 2.4 refuses
    for a 1-element array that is not 0-d (transformers' attention reshapes trace to such values): cast its
    item instead. Without this `ct.convert` stops at the first attention layer."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    original = ops._cast

    def cast(context, node, dtype, dtype_name):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            context.add(mb.const(val=dtype(x.val.item()), name=node.name), node.name)
        else:
            original(context, node, dtype, dtype_name)

    ops._cast = cast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", default="int4", choices=("int4", "int8", "fp16"))
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                    help="the dtype transformers loads the weights in (float16 halves the memory the flow needs)")
    args = ap.parse_args()

    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 1)
        t = now

    import coremltools as ct
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    scalar_casts_for_numpy2()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="eager")
    model.eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, causal_mask):
            return self.lm(input_ids=input_ids, attention_mask=causal_mask, use_cache=False,
                           return_dict=False)[0]

    step("load")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = torch.triu(torch.full((1, 1, 8, 8), float("-inf"), dtype=getattr(torch, args.dtype)), diagonal=1)
        traced = torch.jit.trace(Logits(model), (torch.zeros(1, 8, dtype=torch.int32), mask), check_trace=False)
    step("trace")
    del model
    length = ct.RangeDim(1, args.max_seq_len, default=1, symbol="length")
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, length, length), dtype=np.float32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)],
        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram", skip_model_load=True)
    del traced
    step("convert")
    if args.quant != "fp16":
        op = (ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                                         granularity="per_block", block_size=32)
              if args.quant == "int4" else
              ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                         granularity="per_channel"))
        mlmodel = ct.optimize.coreml.linear_quantize_weights(
            mlmodel, ct.optimize.coreml.OptimizationConfig(global_config=op))
        step("compress")
    mlmodel.save(str(args.out))
    step("save")
    print(json.dumps({"coremltools": ct.__version__, "steps_s": steps}))


if __name__ == "__main__":
    main()
