"""Exports and runtimes: export (when no command is given), the ExecuTorch job, bench, generate, serve."""
from __future__ import annotations

import sys
from pathlib import Path

from d2m_export.errors import UserError


def cmd_export(args) -> int:
    if not args.export_out:
        raise UserError("--target needs --out DIR")
    options = {"max_seq_len": args.export_max_seq_len, "moe_lowering": args.export_moe_lowering,
               "head_bits": args.export_head_bits}
    if "," not in args.export_target:
        from d2m_export.api import export

        manifest = export(args.export_model, Path(args.export_out), args.export_target, args.export_quant,
                          threads=args.export_threads, parity=not args.export_no_parity, **options).manifest
        print_export(manifest, args.export_out)
        return 0
    from converters.base import export_many

    # several targets: each reported as it is written (a later one may still fail)
    export_many(args.export_target, args.export_model, args.export_quant, Path(args.export_out),
                threads=args.export_threads, options=options, parity=not args.export_no_parity,
                on_done=lambda name, manifest: print_export(manifest, Path(args.export_out) / name))
    return 0


def print_export(manifest: dict, out) -> None:
    """What an export wrote and how its parity check went (a warning on stderr where it was skipped)."""
    p, sizes = manifest["parity"], manifest["sizes_mb"]
    print(f"{manifest['target']} {manifest['quant']}: wrote {', '.join(f'{f} ({mb:.1f} MB)' for f, mb in sizes.items())} "
          f"to {out}", flush=True)
    if p is None:
        print(f"d2m-export: warning: --no-parity: {out} was not checked against transformers (manifest.json: "
              "\"parity\": null, \"parity_skipped\": true)", file=sys.stderr, flush=True)
        return
    print(f"  parity vs transformers: greedy {p['greedy_match']}/{p['greedy_total']} tokens, "
          f"max |logit error| {p['max_abs_logit_err']:.3g}" + (" (reference shared with the run's earlier target)"
                                                                 if p.get("reference_shared") else ""))
    if text := p.get("text"):
        print(f"  fixed text ({text['positions']} positions): top-1 agreement {text['top1_agreement']:.3f} "
              f"({text['decisive_top1_agreement']} where the reference is decisive), mean KL {text['mean_kl']:.3g} "
              f"nats, perplexity x{text['ppl_ratio']:.3f}", flush=True)


def cmd_executorch_job(args) -> int:
    """`d2m-export --target executorch` alone: the whole main job on the embedded default model."""
    from converters.executorch import main_job

    main_job(Path("runs/executorch"), quant=args.export_quant, threads=args.export_threads or 2)
    return 0


def cmd_bench(args) -> int:
    from d2m_export.api import bench

    result = bench(args.dir, args.out, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   threads=args.threads, repeats=args.repeats, runtime=args.runtime, context=args.context).result
    print(f"{result['runtime']} {result['quant']}, {result['threads']} threads, context {result['context']}: "
          f"prefill "
          f"{result['prefill_tokens_per_s']:.1f} tok/s, decode {result['decode_tokens_per_s']:.1f} tok/s "
          f"(p50 {result['decode_ms_per_token_p50']:.2f} ms), peak RSS {result['peak_rss_mb']:.0f} MB")
    return 0


def cmd_generate(args) -> int:
    import time

    from runtimes.base import load_runner, load_tokenizer
    from runtimes.bench import check_context, n_ctx_for, prompt_ids

    tokenizer = load_tokenizer(Path(args.dir))
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UserError("--prompt is empty after tokenization")
    context = len(ids) if args.context is None else args.context
    if context < len(ids):
        raise UserError(f"--context {context} is shorter than the prompt ({len(ids)} tokens)")
    limit = check_context(Path(args.dir), context, args.max_new_tokens, args.runtime)
    # the bench's filler text ahead of the prompt, so that decoding starts with `context` tokens cached
    filler = prompt_ids(Path(args.dir), context - len(ids)) if context > len(ids) else []
    from runtimes.base import STOP_TOKENS
    stop = [i for i in (tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None]
    out: list[int] = []
    shown = ""

    def show(token: int) -> None:
        nonlocal shown
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):      # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    decode_s: list[float] = []
    with load_runner(Path(args.dir), threads=args.threads, runtime=args.runtime,
                     n_ctx=n_ctx_for(context, args.max_new_tokens, limit)) as runner:
        decode = runner.decode

        def timed_decode(token: int):        # the runner's own step, timed apart from printing
            t0 = time.perf_counter()
            logits = decode(token)
            decode_s.append(time.perf_counter() - t0)
            return logits

        runner.decode = timed_decode
        print(args.prompt, end="", flush=True)      # once the runner loaded: an error is then the only output
        runner.generate(filler + ids, args.max_new_tokens, stop_ids=stop, on_token=show)
    print()
    if decode_s:    # on stderr: stdout is the text alone
        import statistics
        ms = statistics.median(decode_s) * 1e3
        print(f"decode {1000 / ms:.1f} tok/s ({ms:.2f} ms/token, median of {len(decode_s)} steps) at a context of "
              f"{context} tokens" + (f" ({len(filler)} of them filler text before the prompt)" if filler else ""),
              file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    """A web export's page with the runtime's files and the headers WebAssembly threads need, until Ctrl-C."""
    from runtimes.web_server import serve

    return serve(Path(args.dir), args.port)
