"""Synthetic multi-camera text-based person search benchmark (see docs/benchmark.md)."""

from sims.synth.generate import SynthConfig, generate
from sims.synth.preview import make_preview

__all__ = ["SynthConfig", "generate", "make_preview"]
