"""Tooling behind `make bench`, `make bench-7b`, `make demo` and `make tiny`; the CLI and the library never import it.

Each module runs as ``python -m retrofit.tools.<name>`` from the repository root, as the Makefile does.
"""
