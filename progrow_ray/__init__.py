"""progrow_ray: progressive depth training (zero/one-layer model expansion) on Ray.

Layers, arrows pointing down only: ``core`` (pure torch) -> ``engine`` -> ``orchestration`` (Ray)
-> ``integrations`` (storage, tracking). Importing this package imports none of them.
"""

__version__ = "0.1.0"
