"""Typed stubs for the Rust extension ``pyquant._core``."""

__version__: str
