"""The shape every export target follows, and the one `export` entry point.

An exporter turns a Hugging Face model folder into runtime artifacts in a temporary directory.
`export` does everything around it, the same way for every target: validate the request,
resolve the model, write atomically, copy the tokenizer, run the parity check in the REAL
runtime against the transformers reference, and write `manifest.json`. A failed parity check
raises `ParityError` inside the atomic write, so nothing is left at `out`.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from d2m_export.errors import ParityError, UserError
from d2m_export.sources.lazy_weights import release_memory
from d2m_export.sources.models import model_label, read_config, read_record, resolve_model
from converters.phases import phase, timing
from d2m_export.outputs import GENERATOR, atomic_dir, check_output_dir, file_checksums

TARGETS: dict[str, "Exporter"] = {}
MANIFEST = "manifest.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def register_target(name: str):
    """Class decorator: `@register_target("gguf")` registers one instance under that name."""
    def wrap(cls):
        cls.name = name
        TARGETS[name] = cls()
        return cls
    return wrap


class Tolerance(NamedTuple):
    """What a parity check (converters.parity) allows. Lossless quants (`exact`): every greedy token of the
    prompts matches and every logit, on the prompts and the fixed text, is within `max_abs_logit_err`.
    Lossy quants (`lossy`): on the fixed text, the top-1 agreement where the reference is decisive and the
    mean KL(reference || export), in nats, are the gate; the greedy match and the logit error are reported
    only (a flipped MoE routing decision moves one position's logits far, and near-ties flip, without the
    export being wrong)."""
    max_abs_logit_err: float | None = None
    min_greedy_fraction: float | None = None
    min_decisive_top1_agreement: float | None = None
    max_mean_kl: float | None = None

    def as_dict(self) -> dict:
        return self._asdict()


def exact(max_abs_logit_err: float) -> Tolerance:
    return Tolerance(max_abs_logit_err=max_abs_logit_err, min_greedy_fraction=1.0)


def lossy(min_decisive_top1_agreement: float, max_mean_kl: float) -> Tolerance:
    return Tolerance(min_decisive_top1_agreement=min_decisive_top1_agreement, max_mean_kl=max_mean_kl)


class Exporter:
    name: str
    description: str = ""
    quants: tuple[str, ...] = ()
    default_quant: str = ""
    # quant -> what the parity check (converters.parity) allows: `exact(...)` for lossless quants,
    # `lossy(...)` with floors measured on SmolLM2 dense and LF-UC exports for the others.
    tolerances: dict[str, "Tolerance"] = {}

    def tolerance(self, quant: str, config) -> "Tolerance":
        """What the parity check allows for `config`'s model at `quant`."""
        return self.tolerances[quant]
    # extra export options this target takes (e.g. "max_seq_len"); `export` passes them as keywords
    options: tuple[str, ...] = ()
    # runtimes besides the target's own that run its files; the parity check runs each of them
    other_runtimes: tuple[str, ...] = ()

    # Bytes per parameter of the artifact at each quant, and of what the toolchain holds at its peak
    # beyond the model itself, per parameter in fp32 (the measured floors in bench/results/scale.md).
    artifact_bytes_per_param: dict[str, float] = {}
    toolchain_fp32_copies: float | dict[str, float] = 0.0      # or one figure per quant

    def memory_need(self, model_dir: Path, quant: str) -> tuple[int, str]:
        """The estimated peak of an export and its parity check, from the config: the model held in its
        stored dtype (the export reads it; the reference computes from it a layer at a time), the runtime
        holding the artifact, and what the toolchain copies (in fp32) beyond them."""
        from d2m_export.sources.memory import weight_bytes
        from d2m_export.sources.models import stored_dtype

        stored = weight_bytes(model_dir, stored_dtype(model_dir))
        fp32 = weight_bytes(model_dir, "float32")
        artifact = int(fp32 / 4 * self.artifact_bytes_per_param.get(quant, 4.0))
        copies = self.toolchain_fp32_copies
        copies = copies.get(quant, max(copies.values())) if isinstance(copies, dict) else copies
        need = max(int(1.3 * stored), int(1.2 * artifact)) + int(copies * fp32)
        how = (f"the larger of the model as stored, {stored / 2**30:.1f} GiB, and the {quant} artifact in its "
               f"runtime, {artifact / 2**30:.1f} GiB")
        if copies:
            how += f", and {copies:g} fp32 copies the {self.name} toolchain makes"
        return need, how

    def export(self, model_dir: Path, quant: str, out_tmp: Path) -> list[str]:
        """Write the artifact(s) for `model_dir` into `out_tmp`; return their file names."""
        raise NotImplementedError

    def details(self, out_tmp: Path, files: list[str]) -> dict:
        """Target-specific facts for the manifest (read back from the artifacts)."""
        return {}

    def check_options(self, config: dict, options: dict) -> dict:
        """Validate this target's options against the model's config before anything is written."""
        return options

    def parity(self, model_dir: Path, export_dir: Path, quant: str, threads: int | None = None,
               new_tokens: int = 32) -> dict:
        """The manifest's `parity`: by default the export run in its real runtime (converters.parity)."""
        from converters.parity import check_parity

        return check_parity(self, model_dir, export_dir, quant, threads=threads, new_tokens=new_tokens,
                            runtimes=self.other_runtimes)

    def adapt_config(self, out_tmp: Path) -> None:
        """Adjust the copied config.json for the consumers of this target's files (by default, as it is)."""

    def verification(self, export_dir: Path, manifest: dict) -> dict | None:
        """The manifest's `verification` (what was and was not checked), for targets that need one."""
        return None

    def forget(self, export_dir: Path) -> None:
        """Drop what `export` kept for the parity check of `export_dir` (the check was skipped: --no-parity)."""


def _import(module: str) -> str | None:
    """Import an exporter module (registering it); return why not, if it cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module}: {e}"
    return None


def get_target(name: str | None) -> Exporter:
    """The exporter for `name`: by convention it lives in `converters/<name>.py`."""
    if name and name.isidentifier() and name not in TARGETS and (Path(__file__).parent / f"{name}.py").is_file():
        if (why := _import(f"converters.{name}")) is not None:
            raise UserError(f"--target {name} cannot be loaded ({why}); install its extra: pip install 'd2m-export[{name}]'")
    if name not in TARGETS:
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):   # every target that registers itself
            if info.name not in ("base", "parity") and not info.name.startswith("_"):
                _import(f"converters.{info.name}")
        raise UserError(f"unknown --target {name!r}; choose one of {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def check_quant(exporter: Exporter, quant: str | None) -> str:
    quant = (quant or exporter.default_quant).lower()
    if quant not in exporter.quants:
        raise UserError(f"--quant {quant!r} is not offered for --target {exporter.name}; "
                        f"choose one of {', '.join(exporter.quants)}")
    return quant


def model_record(model_dir: Path) -> tuple[str | None, dict | None]:
    """(base_model, plan) from a d2m_plan.json beside the model, if there is one."""
    record = read_record(model_dir) or {}
    return record.get("base_model"), record.get("plan")


def copy_tokenizer(model_dir: Path, out_tmp: Path) -> list[str]:
    """The tokenizer files, and the model's config.json / generation_config.json, which optimum's
    ORTModelForCausalLM and ExecuTorchModelForCausalLM read beside the artifact."""
    for name in CONFIG_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(out_tmp) / name)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(out_tmp) / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise UserError(f"{model_dir} has no tokenizer.json; the export needs the model's (fast) tokenizer")
    return copied


def _write_manifest(out_tmp: Path, manifest: dict) -> None:
    (Path(out_tmp) / MANIFEST).write_text(json.dumps({"generator": GENERATOR, **manifest}, indent=2) + "\n")


def path_bytes(path: Path) -> int:
    """Size of a file, or of a directory artifact (a Core ML .mlpackage) with everything in it."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())




# --- the export ---------------------------------------------------------------------------------------

@dataclass
class _Request:
    """One target's export, checked: its exporter, quant, options and output folder."""
    exporter: Exporter
    quant: str
    options: dict
    out: Path


@dataclass
class _Source:
    """What every target of a run shares: the model resolved, its config and its d2m_plan.json record."""
    spec: object
    model_dir: Path
    config: dict
    base_model: str | None
    plan: dict | None
    prepare_s: float = 0.0


def _request(target: str, quant: str | None, options: dict | None, out: Path, others: bool = False) -> _Request:
    """`target` at `quant` (None: its default) with `options`; with `others`, options this target does not
    take are left to the run's other targets instead of refused."""
    exporter = get_target(target)
    quant = check_quant(exporter, quant)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for key in list(options):
        if key not in exporter.options:
            if not others:
                raise UserError(f"--{key.replace('_', '-')} is not used by --target {exporter.name}")
            del options[key]
    return _Request(exporter, quant, options, Path(out))


def _source(model_spec, out: Path) -> _Source:
    model_dir = resolve_model(model_spec)
    src, dst = Path(model_dir).resolve(), Path(out).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise UserError(f"--out {out} would overwrite the model it exports ({model_dir}); pick a directory beside it")
    return _Source(model_spec, model_dir, {}, None, None)


def _check(request: _Request, source: _Source) -> None:
    """Everything about one target that can be refused before anything is written."""
    from d2m_export.sources.memory import check_memory

    exporter, model_dir = request.exporter, source.model_dir
    request.options = exporter.check_options(source.config, request.options)
    check_memory(model_dir, f"export --target {exporter.name} --quant {request.quant}",
                 *exporter.memory_need(model_dir, request.quant))


def _read_source(source: _Source) -> None:
    if not (Path(source.model_dir) / "tokenizer.json").is_file():
        raise UserError(f"{source.model_dir} has no tokenizer.json; the export needs the model's (fast) tokenizer")
    source.config = read_config(source.model_dir)
    source.base_model, source.plan = model_record(source.model_dir)


def export(target: str, model_spec, quant: str | None, out: Path, threads: int | None = None,
           new_tokens: int = 32, options: dict | None = None, parity: bool = True) -> dict:
    """Export `model_spec` for `target` at `quant` into `out`, checked against transformers (unless
    `parity` is False: then the manifest records `"parity": null, "parity_skipped": true`)."""
    t0 = time.perf_counter()
    request = _request(target, quant, options, out)
    source = _source(model_spec, out)
    check_output_dir(request.out)
    _read_source(source)
    _check(request, source)
    source.prepare_s = time.perf_counter() - t0
    return _run(request, source, threads, new_tokens, parity)


def export_many(targets: list[str], model_spec, quants, out: Path, threads: int | None = None,
                new_tokens: int = 32, options: dict | None = None, parity: bool = True,
                on_done=None) -> dict[str, dict]:
    """Export `model_spec` for each of `targets` into `out`/<target>/, each a complete export (its own
    manifest.json and parity record), sharing the model's resolution and config and the parity reference
    (computed once, `converters.parity.shared_reference`). `quants`: None (each target's default), one quant
    every target takes, or one per target (a list, or comma-separated; an empty entry is the default).
    `options` go to the targets that take them (an option no target takes is refused). Everything is
    checked before anything is written. A target that fails its parity check leaves nothing and the run
    goes on; the others stay, and a ParityError naming the failed targets is raised at the end.
    `on_done(name, manifest)` is called as each target is written. Returns {target: manifest}."""
    from converters.parity import shared_reference

    t0 = time.perf_counter()
    if isinstance(targets, str):
        targets = targets.split(",")
    targets = [t.strip() for t in targets]
    if not targets or not all(targets):
        raise UserError("--target takes target names separated by commas, e.g. onnx,gguf")
    if len(set(targets)) != len(targets):
        raise UserError(f"--target {','.join(targets)} names a target twice")
    if quants is None or isinstance(quants, str):
        quants = (quants or "").split(",")
    quants = [(q or "").strip() or None for q in quants]
    if len(quants) == 1:
        quants = quants * len(targets)
    if len(quants) != len(targets):
        raise UserError(f"--quant takes one quant for every target, or one per target ({len(targets)}, comma-"
                        f"separated, in --target's order), not {len(quants)}")
    out = Path(out)
    requests = [_request(t, q, options, out / t, others=True) for t, q in zip(targets, quants)]
    for key, value in (options or {}).items():
        if value is not None and not any(key in r.options for r in requests):
            raise UserError(f"--{key.replace('_', '-')} is not used by any of --target {','.join(targets)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; several targets are written to a directory")
    if (out / MANIFEST).exists():
        raise UserError(f"--out {out} holds an export of its own; several targets go to a new directory "
                        "(one folder per target)")
    source = _source(model_spec, out)
    for r in requests:
        check_output_dir(r.out)
    _read_source(source)
    for r in requests:
        _check(r, source)
    source.prepare_s = time.perf_counter() - t0
    manifests, failed, made = {}, [], not out.exists()
    try:
        with shared_reference():
            for r in requests:
                try:
                    manifests[r.exporter.name] = _run(r, source, threads, new_tokens, parity)
                except ParityError as e:
                    failed.append(f"--target {r.exporter.name} failed, nothing written to {r.out}: {e}")
                    continue
                if on_done is not None:
                    on_done(r.exporter.name, manifests[r.exporter.name])
    finally:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()           # every target failed: not even the folder is left
    if failed:
        done = f"; written: {', '.join(str(out / name) for name in manifests)}" if manifests else ""
        raise ParityError("; ".join(failed) + done)
    return manifests


def _run(request: _Request, source: _Source, threads: int | None, new_tokens: int, parity: bool) -> dict:
    """Write one checked request atomically: the artifact, tokenizer, parity check and manifest."""
    exporter, quant, out, model_dir = request.exporter, request.quant, request.out, source.model_dir
    timings = {"prepare": source.prepare_s}
    t0 = time.time()
    start = time.perf_counter()
    with atomic_dir(out) as tmp, timing(timings):
        with phase("export"):
            files = exporter.export(model_dir, quant, tmp, **request.options)
        with phase("manifest"):
            details = exporter.details(tmp, files)
            manifest = {
                "target": exporter.name, "files": files, "model": model_label(source.spec),
                "base_model": source.base_model or model_label(source.spec), "plan": source.plan, "quant": quant,
                # what the export holds: its KV cache / position table where it has one, else the model's
                "context_length": details.get("max_seq_len") or details.get("max_positions")
                                  or source.config.get("max_position_embeddings"),
                "tokenizer": copy_tokenizer(model_dir, tmp),
                "sizes_mb": {f: round(path_bytes(tmp / f) / 2**20, 2) for f in files},
                exporter.name: details,
                "parity": None,
                "parity_skipped": not parity,
            }
            if (tmp / "config.json").is_file():
                exporter.adapt_config(tmp)
            _write_manifest(tmp, manifest)           # the runner reads it to load the export
        export_s = time.time() - t0
        if parity:
            release_memory()      # the export's model (reference cycles hold it) before the reference loads
            with phase("parity"):
                manifest["parity"] = exporter.parity(model_dir, tmp, quant, threads=threads, new_tokens=new_tokens)
            if (verification := exporter.verification(tmp, manifest)) is not None:
                manifest["verification"] = verification
        else:
            exporter.forget(tmp)
        manifest["wall_s"] = {"export": round(export_s, 1), "parity": round(time.time() - t0 - export_s, 1)}
        with phase("checksums"):
            # runners check these before a runtime parses the files (a damaged file can crash a native parser)
            manifest["checksums"] = file_checksums(tmp, skip=(MANIFEST,))
        manifest["timings_s"] = {k: round(v, 3) for k, v in {**timings, "total": source.prepare_s + time.perf_counter()
                                                               - start}.items()}
        _write_manifest(tmp, manifest)
    return manifest
