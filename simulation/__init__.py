"""Simulators that drive the built-in plugins' code without sockets, for tests and benchmarks.
Not part of the installed package."""
