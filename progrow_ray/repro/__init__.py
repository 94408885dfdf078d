"""Reproduction suite: one command per paper takeaway (``python -m progrow_ray.repro LIST``)."""
