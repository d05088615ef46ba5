"""The package version, in a module of its own: modules inside the package read it from here, since
importing the package itself from them would close an import cycle through its re-exported API."""

__version__ = "0.1.0"
