"""Fixtures shared by test modules."""

from tests.netbed import netbed

__all__ = ["netbed"]
