from .base import ALGORITHMS, BlockContext, BlockResult, register, resolve

__all__ = ["ALGORITHMS", "BlockContext", "BlockResult", "register", "resolve"]
