"""Exceptions shared across d2m-export."""


class UserError(Exception):
    """Bad input; the CLI prints it on one line and exits 2."""


class ParityError(Exception):
    """An export ran but did not match the PyTorch reference; the CLI exits 1."""
