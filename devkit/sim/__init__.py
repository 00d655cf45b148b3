"""The deterministic simulator of the whole sync (dev kit only, never deployed): see docs/simulation.md."""
