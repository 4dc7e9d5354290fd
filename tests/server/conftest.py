"""Broker test fixtures live in broker_fixtures.py (importable helpers + fixtures)."""

from broker_fixtures import scripted_nodes, start_broker, tiny_model

__all__ = ["scripted_nodes", "start_broker", "tiny_model"]
