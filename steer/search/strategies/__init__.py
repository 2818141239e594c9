"""Built-in strategies; importing this package registers them."""

from steer.search.strategies import basic, debate, reflection, sampling, tot

__all__ = ["basic", "debate", "reflection", "sampling", "tot"]
