"""Flag types that validate while the command line is parsed, before any model is loaded or any file
written, and a parser whose errors are one line (`d2m-export: error: ...`, exit 2)."""
from __future__ import annotations

import argparse
import math
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage block before the error; we print the error alone, with where to look."""

    def parse_known_args(self, args=None, namespace=None):
        for arg in sys.argv[1:] if args is None else args:
            flag, sep, value = str(arg).partition("=")
            if flag.startswith("--") and sep and value == "--":   # argparse would drop the "--" and keep the default
                self.error(f"argument {flag}: expected a value, not '--'")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        flag, sep, rest = message.removeprefix("argument ").partition(": ")
        if message.startswith("argument -") and sep:       # "argument --tokens: must be ..." -> "--tokens must be ..."
            message = f"{flag.split('/')[-1]} {rest}"
        print(f"d2m-export: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, not {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def int_at_least(low: int, why: str = ""):
    """An integer ≥ low; `why` says where the floor comes from (shown in the error)."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{f' ({why})' if why else ''}, not {value}")
        return value
    parse.__name__ = f"integer ≥ {low}"
    parse.bounds, parse.open_low, parse.open_high = (low, None, True), False, False   # read by the property tests
    return parse


def int_in(low: int, high: int):
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], not {value}")
        return value
    parse.__name__ = f"integer in [{low}, {high}]"
    parse.bounds, parse.open_low, parse.open_high = (low, high, True), False, False
    return parse


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high] (an open end where asked; None: unbounded)."""
    def parse(text: str) -> float:
        value = _number(float, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low and low == 0 and low_open and high is None:
            raise argparse.ArgumentTypeError(f"must be positive, not {value:g}")
        if too_low or too_high:
            lo = "-∞" if low is None else f"{low:g}"
            hi = "∞" if high is None else f"{high:g}"
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open or low is None else '['}{lo}, {hi}"
                                             f"{')' if high_open or high is None else ']'}, not {value:g}")
        return value
    parse.__name__ = "number"
    parse.bounds, parse.open_low, parse.open_high = (low, high, False), low_open, high_open
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
POSITIVE_FLOAT = float_in(0, None, low_open=True)
NON_NEGATIVE_FLOAT = float_in(0, None)
FRACTION = float_in(0, 1)                              # [0, 1]
RATIO = float_in(0, 1, low_open=True)                  # (0, 1]
FINITE = float_in()
PORT = int_in(0, 65535)                                # 0: a free port, chosen when the server binds
# Token budgets hold at least one window of the stage's text (calibration.calibration_ids: 256;
# heal.WINDOW: 256, one window fitted and one held out; evaluation.perplexity: 512)
CALIB_TOKENS = int_at_least(256, "one calibration window")
HEAL_TOKENS = int_at_least(512, "one window to fit, one held out")
PPL_TOKENS = int_at_least(512, "one perplexity window")
