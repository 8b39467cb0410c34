"""Padded lengths, so a stream of inputs of every length compiles a handful of shapes.

A jitted function recompiles for every new input shape; scoring, generation and the proxy ranking
model pad each batch to a *bucketed* length instead of its exact longest row.
"""
from __future__ import annotations


def bucket_length(n: int, multiple: int = 64) -> int:
    """The padded length (tokens) for a longest row of ``n`` tokens: powers of two from 8 up to
    ``multiple``, then multiples of ``multiple`` (at most ``multiple - 1`` padding tokens per row)."""
    if n <= multiple:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // multiple) * multiple
