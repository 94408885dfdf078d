"""Ray layer: τ search with Ray Tune, phases with Ray Train. Imports ray lazily (inside functions)."""
