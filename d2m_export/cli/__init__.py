"""`d2m-export`: the command line. Each stage's subcommand is a thin shell over `d2m_export.api`
(the Python API), which runs the pipeline; the others call their module directly."""
from __future__ import annotations

import logging
import sys
import warnings

from d2m_export.cli.parser import build_parser, task_list
from d2m_export.cli.targets import cmd_executorch_job, cmd_export
from d2m_export.errors import ParityError, UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help, --version, or a bad flag (one line already printed): its exit code
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from runtimes.base import show_native_logs
    show_native_logs(args.verbose)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if not args.verbose:    # third-party noise met on every run: torchao's import, ExecuTorch's lowering
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        for message in ("_check_is_size will be removed", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        "Mutation on a buffer in the model is detected"):   # the KV cache: its start is never read
            warnings.filterwarnings("ignore", message=message)
    if not getattr(args, "func", None):
        if args.export_target is None:
            parser.print_help()
            return 2
        main_job = args.export_target == "executorch" and args.export_model is None and args.export_out is None
        args.func = cmd_executorch_job if main_job else cmd_export
    try:
        if getattr(args, "tasks", None) is not None:
            args.tasks = task_list(args.tasks)
        return args.func(args)
    except UserError as e:
        _close_progress_bars()
        print(f"d2m-export: error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        _close_progress_bars()
        print(f"d2m-export: parity check failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:       # an unwritable or impossible output path, a full disk
        _close_progress_bars()
        print(f"d2m-export: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """A bar still open when an error stops the work would put the error on the bar's own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
