"""Persistent state: the embedded SQLite store (local scope)."""

from .sqlite import SCHEMA_VERSION, SQLiteStore

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]
