"""Node test fixtures live in node_fixtures.py (importable helpers + fixtures)."""

from node_fixtures import serve_node

__all__ = ["serve_node"]
