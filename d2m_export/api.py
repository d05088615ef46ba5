"""The Python API: each stage of the pipeline as one function, for scripts and notebooks.

The command line is a thin layer over these functions: `d2m-export analyze|convert|heal|eval|train|bench`
and `d2m-export --target` each parse their flags, call the function here and print a summary. Each
function takes paths and options (keyword arguments named after the command's flags, `-` as `_`), writes
exactly what the command writes, and returns a small hand-off: a frozen dataclass holding the output path
and the JSON the stage wrote (`similarity.json`, `d2m_plan.json`, `manifest.json`, the eval or bench
results). Hand-offs serialise with `to_dict()`, and those that name a directory or file are path-like
(`os.fspath`), so one stage's result is the next stage's input.

Example (the `model, runs, ...` line names the inputs; tests/test_api.py runs it on a tiny model)::

    from pathlib import Path
    from d2m_export import analyze, bench, convert, export

    model, runs, calib_tokens, ratio = "smollm2-135m", Path("runs/api"), 2048, 0.8
    analysis = analyze(model, runs / "analysis", calib_tokens=calib_tokens)
    moe = convert(model, runs / "lfuc", analysis=analysis, calib_tokens=calib_tokens,
                  target_active_ratio=ratio, heal=False)
    onnx = export(moe, runs / "lfuc-onnx", "onnx", "fp32")
    speed = bench(onnx, runs / "lfuc-onnx.bench.json")
    print(moe.plan["params"]["active_ratio"], onnx.manifest["parity"]["greedy_match"],
          speed.result["decode_tokens_per_s"])

`heal` and `train` are imported from here (`from d2m_export.api import heal, train`): in the package
namespace those two names are the subpackages `d2m_export.heal` and `d2m_export.train`, and Python binds
an imported subpackage onto its parent under its own name, so a function of that name there would turn
into the module as soon as anything imported the subpackage (as `convert` does when it heals).

Importing this module (and `d2m_export`) is cheap: torch, transformers and the exporters load inside the
functions that use them. Bad input raises `d2m_export.errors.UserError`, whose message names the
command-line flag of the offending option.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

__all__ = ["Analysis", "Benchmark", "Checkpoint", "Evaluation", "Export", "Exports", "DEFAULT_TASKS", "analyze", "bench",
           "convert", "evaluate", "export", "heal", "train"]

PathLike = Union[str, os.PathLike]
ModelSpec = Union[str, os.PathLike, None]   # embedded name (None: the default), folder, .gguf file, Hub id or hand-off

DEFAULT_TASKS = ["arc_easy", "hellaswag", "piqa"]     # `eval --tasks` default


class _HandOff:
    def to_dict(self) -> dict:
        """The hand-off as JSON-serialisable data (paths as strings)."""
        return {f.name: str(v) if isinstance(v, Path) else v for f in fields(self) for v in [getattr(self, f.name)]}


@dataclass(frozen=True)
class Analysis(_HandOff):
    """What `analyze` wrote: `dir` holds similarity.json (its content: `similarity`) and similarity.png.
    As a path it is similarity.json, which `convert(analysis=...)` reads."""
    dir: Path
    similarity: dict

    @property
    def path(self) -> Path:
        return self.dir / "similarity.json"

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Checkpoint(_HandOff):
    """A Hugging Face checkpoint written by `convert`, `heal` or `train`: the folder (`dir`, also its path)
    and its d2m_plan.json (`plan`: the method, plan, parameter counts, healing and training records)."""
    dir: Path
    plan: dict

    def __fspath__(self) -> str:
        return str(self.dir)

    @classmethod
    def read(cls, out: PathLike) -> Checkpoint:
        from d2m_export.sources.models import RECORD

        path = Path(out) / RECORD
        return cls(Path(out), json.loads(path.read_text()) if path.is_file() else {})


@dataclass(frozen=True)
class Export(_HandOff):
    """An export written by `export`: the folder (`dir`, also its path) and its manifest.json (`manifest`:
    target, quant, files, sizes, parity against transformers, checksums)."""
    dir: Path
    manifest: dict

    def __fspath__(self) -> str:
        return str(self.dir)


@dataclass(frozen=True)
class Exports(_HandOff):
    """Several targets' exports of one model, written by `export` with a list of targets: the folder (`dir`,
    also its path) holding one folder per target, and each target's `Export` (`exports["onnx"]`, ...)."""
    dir: Path
    exports: dict

    def __fspath__(self) -> str:
        return str(self.dir)

    def __getitem__(self, target: str) -> Export:
        return self.exports[target]

    def to_dict(self) -> dict:
        return {"dir": str(self.dir), "exports": {k: v.to_dict() for k, v in self.exports.items()}}


@dataclass(frozen=True)
class Evaluation(_HandOff):
    """`evaluate`'s results (perplexity, tasks, params) and the JSON file they were written to, if any
    (the file adds a `generator` tag)."""
    result: dict
    path: Path | None = None


@dataclass(frozen=True)
class Benchmark(_HandOff):
    """`bench`'s results (prefill and decode speed, peak RSS, settings) and the JSON file they were
    written to, if any (the file adds a `generator` tag)."""
    result: dict
    path: Path | None = None


def _model(spec: ModelSpec):
    """A `--model` value as the pipeline takes it: names and paths as given, hand-offs as their folder."""
    if spec is None or isinstance(spec, (str, Path)):
        return spec
    return Path(os.fspath(spec))


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(os.fspath(value))


def analyze(model: ModelSpec, out: PathLike, *, calib_tokens: int = 2048, progress: bool = True) -> Analysis:
    """`d2m-export analyze`: score every block of consecutive layers for redundancy on `calib_tokens`
    calibration tokens; writes `out`/similarity.json and similarity.png."""
    from d2m_export import pipeline

    pipeline.analyze(_model(model), Path(out), calib_tokens=calib_tokens, progress=progress)
    return Analysis(Path(out), json.loads((Path(out) / "similarity.json").read_text()))


def convert(model: ModelSpec, out: PathLike, *, method: str = "lfuc", plan: PathLike | None = None,
            target_active_ratio: float | None = None, threshold: float | None = None,
            latency_budget_ms: float | None = None, device: str | None = None, precision: str = "fp16",
            context: int = 512, runtime: str | None = None, plan_search: str = "metric", search_tokens: int = 1024,
            analysis: PathLike | None = None, calib_tokens: int = 2048, max_block: int = 4, min_mlp_cos: float = -1.0,
            host_mode: str | None = None, top_k: int | None = None, num_experts: int | None = None,
            router_init: str | None = None, alpha: float | None = None, beta: float | None = None,
            heal: bool | None = None, heal_tokens: int | None = None, heal_steps: int | None = None,
            experts_kept: int | None = None, groups: int | None = None, score: str = "acp", grouping: str = "score",
            scaling: str = "score", dtype: str = "auto", progress: bool = True) -> Checkpoint:
    """`d2m-export convert`: write `model` converted by `method` (lfuc, prune, upcycle or moe2dense) to `out`
    as a Hugging Face checkpoint with its d2m_plan.json.

    The plan comes from at most one of `plan` (a YAML/JSON file), `target_active_ratio` (default 0.8),
    `threshold` or `latency_budget_ms` (with `device`, `precision`, `context`, `runtime`); `plan_search`
    "loss" grows it by calibration KL instead. `analysis` reuses a similarity.json (or an `Analysis`).
    `host_mode`, `top_k`, `num_experts`, `router_init`, `alpha`, `beta`: the MoE options (None: their
    defaults, as `plan.Options` has them). `heal`: None heals dense → MoE conversions by default
    (`heal_tokens`, `heal_steps`: its budget) and not moe2dense; False skips it (`--no-heal`); True asks
    for it. moe2dense takes `experts_kept` (K), `groups`, `score`, `grouping`, `scaling`."""
    from d2m_export import pipeline
    from d2m_export.errors import UserError
    from d2m_export.plan import Options

    heal_config = convert_heal_config(method, heal, heal_tokens, heal_steps)
    if method == "moe2dense":
        if experts_kept is None:
            raise UserError("--method moe2dense needs --experts-kept K")
        pipeline.moe_to_dense(_model(model), Path(out), experts_kept, groups, score, calib_tokens=calib_tokens,
                              grouping=grouping, scaling=scaling, dtype=dtype,
                              not_healed="--no-heal" if heal is False else None, progress=progress)
        return Checkpoint.read(out)
    options = Options(**{k: v for k, v in (("host_mode", host_mode), ("top_k", top_k), ("num_experts", num_experts),
                                           ("router_init", router_init), ("alpha", alpha), ("beta", beta))
                         if v is not None})
    pipeline.convert(_model(model), Path(out), method_name=method, plan_file=_path(plan),
                     target_ratio=target_active_ratio, threshold=threshold, options=options,
                     analysis=_path(analysis), calib_tokens=calib_tokens, max_block=max_block, min_mlp_cos=min_mlp_cos,
                     latency_budget_ms=latency_budget_ms, device=device, precision=precision, context=context,
                     runtime=runtime, plan_search=plan_search, search_tokens=search_tokens, heal=heal_config,
                     dtype=dtype, not_healed="--no-heal", progress=progress)
    return Checkpoint.read(out)


def convert_heal_config(method: str, heal: bool | None, heal_tokens: int | None, heal_steps: int | None):
    """`convert` heals by default; `--no-heal` (heal=False) skips it. Returns the HealConfig, or None when
    skipped."""
    budget_flags = [f for f, v in (("--heal-tokens", heal_tokens), ("--heal-steps", heal_steps)) if v is not None]
    if heal is False:
        if budget_flags:
            from d2m_export.errors import UserError
            raise UserError(f"--no-heal skips healing; drop {' and '.join(budget_flags)} (the healing budget) "
                            "or --no-heal")
        return None
    if method == "moe2dense":
        if heal or budget_flags:
            from d2m_export.errors import UserError
            from d2m_export.pipeline import MOE2DENSE_NOT_HEALED
            raise UserError(f"{'--heal' if heal else budget_flags[0]}: {MOE2DENSE_NOT_HEALED}")
        return None
    from d2m_export.heal import HealConfig
    return HealConfig(**{k: v for k, v in (("calib_tokens", heal_tokens), ("steps", heal_steps)) if v is not None})


def heal(model: ModelSpec, out: PathLike, *, calib_tokens: int | None = None, steps: int | None = None,
         lr: float | None = None, attention: bool = False, corpora: list[str] | None = None,
         dense: ModelSpec = None, progress: bool = True) -> Checkpoint:
    """`d2m-export heal`: fit a converted model's fused layers to the dense blocks they replace and write
    the healed checkpoint to `out`. `calib_tokens`, `steps` (per block), `lr`: None for `HealConfig`'s
    defaults (8192, 150, 1e-4); `corpora`: training corpora (default: the calibration text); `dense`: the
    dense model (default: the one recorded in d2m_plan.json)."""
    from d2m_export.heal import HealConfig, heal as heal_checkpoint

    budget = {k: v for k, v in (("calib_tokens", calib_tokens), ("steps", steps), ("lr", lr)) if v is not None}
    cfg = HealConfig(**budget, attention=attention, corpora=[str(c) for c in corpora] if corpora else ["calibration"])
    heal_checkpoint(_model(model), Path(out), cfg, dense_spec=_model(dense), progress=progress)
    return Checkpoint.read(out)


def train(model: ModelSpec, out: PathLike, *, corpora: list[str] | None = None, data: PathLike | None = None,
          **config) -> Checkpoint:
    """`d2m-export train`: continual pre-training of `model`, written to `out` (final model, checkpoints/,
    train_log.jsonl, loss.png). Text from `corpora` (default: brown and olmo-passages) or token shards
    from `data` (`d2m-export tokenize`), not both; `config`: any other `train.TrainConfig` field (`tokens`,
    `seq_len`, `lr`, `distill_from`, `fsdp`, ...; the `train` flags with `_` for `-`). In a distributed
    run every process calls it; the returned `plan` (d2m_plan.json, with its `training` record) is read
    once the run's writer has finished it."""
    from d2m_export.errors import UserError
    from d2m_export.train import TrainConfig, train as run_training

    unknown = sorted(set(config) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"train() got unexpected option(s) {', '.join(unknown)}")
    if corpora and data:
        raise UserError("give either --corpus (text, tokenized now) or --data (token shards), not both")
    values = {"model": str(_model(model)), "out": os.fspath(out),
              **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in config.items()},
              "data": None if data is None else os.fspath(data)}
    if corpora:
        values["corpora"] = [str(c) for c in corpora]
    run_training(TrainConfig(**values))
    return Checkpoint.read(out)


def evaluate(model: ModelSpec, out: PathLike | None = None, *, tasks: list[str] | None = None,
             limit: int | None = None, ppl_tokens: int = 10240, batch_size: int = 8) -> Evaluation:
    """`d2m-export eval`: perplexity on held-out text and zero-shot `tasks` (default `DEFAULT_TASKS`; []:
    perplexity only), on the first `limit` documents per task; written as JSON to `out` if given."""
    from d2m_export import pipeline

    result = pipeline.evaluate(_model(model), _path(out), tasks=list(DEFAULT_TASKS if tasks is None else tasks),
                               limit=limit, ppl_tokens=ppl_tokens, batch_size=batch_size)
    return Evaluation(result, _path(out))


def export(model: ModelSpec, out: PathLike, target: str | list[str], quant: str | list[str] | None = None, *,
           threads: int | None = None, max_seq_len: int | None = None, moe_lowering: str | None = None,
           head_bits: int | None = None, parity: bool = True) -> Export | Exports:
    """`d2m-export --target TARGET`: export `model` (a folder, a `Checkpoint`, ...) for `target` (gguf, onnx,
    coreml, executorch) at `quant` (None: the target's default) into `out`, checked against transformers
    (`threads`: the parity run's; `parity=False` skips the check, `--no-parity`, and the manifest records
    `"parity": null, "parity_skipped": true`). `max_seq_len`, `moe_lowering`, `head_bits`: the targets'
    options (None: their defaults; a target refuses one it does not use).

    Several targets (a list, or names separated by commas: `--target onnx,gguf`) export one model into
    `out`/<target>/ each, sharing the model's resolution and the parity reference (computed once); `quant`
    is then None (each target's default), one quant all of them take, or one per target (a list, or
    comma-separated, in the targets' order); options go to the targets that take them. Returns `Exports`.
    A target failing its parity check leaves no folder; the others are written, then ParityError is raised."""
    from converters.base import MANIFEST, export as export_model, export_many

    options = {"max_seq_len": max_seq_len, "moe_lowering": moe_lowering, "head_bits": head_bits}
    if isinstance(target, (list, tuple)) or "," in target:
        manifests = export_many(target, _model(model), quant, Path(out), threads=threads, options=options,
                                parity=parity)
        return Exports(Path(out), {name: Export(Path(out) / name, json.loads((Path(out) / name / MANIFEST).read_text()))
                                   for name in manifests})
    export_model(target, _model(model), quant, Path(out), threads=threads, options=options, parity=parity)
    return Export(Path(out), json.loads((Path(out) / MANIFEST).read_text()))


def bench(export_dir: PathLike, out: PathLike | None = None, *, context: int | None = None,
          prompt_tokens: int | None = None, new_tokens: int = 64, threads: int = 2, repeats: int = 3,
          runtime: str | None = None) -> Benchmark:
    """`d2m-export bench`: time an export in its runtime (`runtime`: None for the target's own): prefill of a
    `context`-token prompt (default 64; `prompt_tokens` is its older name), then `new_tokens` greedy decode
    steps, `repeats` timed runs after a warm-up, medians. Written as JSON to `out` if given (beside the
    export, not inside it)."""
    from d2m_export.errors import UserError
    from d2m_export.outputs import check_output_file, write_json
    from runtimes.bench import bench as run_bench

    if out is not None:
        if _path(export_dir).resolve() in _path(out).resolve().parents:
            raise UserError(f"--out {os.fspath(out)} is inside the export {os.fspath(export_dir)}; write the results "
                            "beside it")
        check_output_file(_path(out))
    result = run_bench(_path(export_dir), prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads,
                       repeats=repeats, runtime=runtime, context=context)
    if out is not None:
        write_json(_path(out), result)
    return Benchmark(result, _path(out))
