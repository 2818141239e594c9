"""Built-in strategies; importing this package registers them."""

from steer.search.strategies import basic, sampling

__all__ = ["basic", "sampling"]
