"""Device profiles, reports and studies: profile, report, sweep, demo."""
from __future__ import annotations

from pathlib import Path

from d2m_export.errors import UserError


def cmd_profile(args) -> int:
    import yaml

    from d2m_export.devices.probe import host_profile

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as device_profiles/host.yaml")
    if out.exists() and "measured" not in out.read_text():
        raise UserError(f"--out {out} exists and is not a measured profile; pick another path")
    profile = host_profile(args.threads)
    if args.calibrate:
        from d2m_export.devices.probe import runtime_efficiency
        from runtimes.base import read_manifest

        long_prompt = args.long_prompt_tokens
        for d in args.calibrate:            # clear errors before any measuring
            context = read_manifest(Path(d)).get("context_length") or 0
            if long_prompt is not None and not 64 + 64 < long_prompt + 64 <= context:
                raise UserError(f"--long-prompt-tokens {long_prompt}: must be above 64 and leave room for 64 new "
                                f"tokens in {d}'s context of {context}")
        profile["runtime_efficiency"], kv = runtime_efficiency([Path(d) for d in args.calibrate], profile,
                                                               threads=profile["threads"],
                                                               long_prompt_tokens=long_prompt)
        names = ", ".join(Path(d).name for d in args.calibrate)
        profile["sources"]["runtime_efficiency"] = (
            "measured: roofline ÷ measured decode time per token (prompt 64, 64 new tokens) of " + names
            if long_prompt is None else "measured: decode time per token of " + names + f" at prompts 64 and "
            f"{long_prompt} (64 new tokens), solved for the efficiency of the weight reads and (runtime_kv_efficiency) "
            "of the KV-cache reads")
        if kv:
            profile["runtime_kv_efficiency"] = kv
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(yaml.safe_dump(profile, sort_keys=False, allow_unicode=True))
    tmp.replace(out)
    print(f"{profile['name']}: {profile['memory_bandwidth_gbs']} GB/s read bandwidth, "
          f"{profile['compute_gflops']['fp32']} GFLOPS fp32 matmul; wrote {out}")
    for key, eff in profile.get("runtime_efficiency", {}).items():
        kv = profile.get("runtime_kv_efficiency", {}).get(key)
        print(f"  {key}: {eff:.0%} of the roofline" + (f" (KV-cache reads: {kv:.0%})" if kv else ""))
    return 0


def cmd_report(args) -> int:
    from d2m_export.evaluation.report import write

    contexts = None if args.context is None else [c for group in args.context for c in group]
    report = write([Path(d) for d in args.run_dirs], Path(args.out), args.devices, contexts=contexts)
    print(f"wrote {args.out}/report.html, report.md, report.json and pareto.png ({len(report['runs'])} variants)")
    for k, names in report["pareto"].items():
        print(f"  frontier {k}: {', '.join(names)}")
    return 0


def cmd_sweep(args) -> int:
    from d2m_export.cli.sweep import run_sweep

    def floats(text):
        try:
            return [float(x) for x in text.split(",") if x]
        except ValueError:
            raise UserError(f"--ratios takes comma-separated numbers, not {text!r}") from None

    report = run_sweep(args.model, Path(args.out), floats(args.ratios), args.methods.split(","),
                       args.targets.split(","), cpt_tokens=args.cpt_tokens, tasks=args.tasks, limit=args.limit,
                       threads=args.threads, profiles=args.devices)
    print(f"report: {args.out}/report/report.html ({len(report['runs'])} variants)")
    return 0


def cmd_demo(args) -> int:
    from d2m_export.cli.demo import run_demo

    return run_demo(Path(args.out), model=args.model, ratio=args.target_active_ratio, limit=args.limit,
                    tasks=args.tasks, heal_steps=args.heal_steps)
