"""Pre-warm phase-2 resources during phase 1.

An autoscaling cluster starts GPU nodes only when something asks for them, which takes minutes. The
autoscaler sees pending placement groups, while ``request_resources`` is overwritten every 20 s by
Ray Train's own coordinator. So during phase 1 we hold a pending placement group of the phase-2 shape
and remove it just before the phase-2 fit, which then finds the nodes up. It is asked for only once
phase 1 trains: created earlier, on a cluster with free room for it but not for both phases, it would
take the resources phase 1's workers are waiting for.
"""

from __future__ import annotations


class PhaseTwoPrewarm:
    def __init__(self, cfg):
        from ray.util.placement_group import placement_group

        bundle = {"CPU": cfg.ray.cpus_per_worker}
        if cfg.ray.use_gpu:
            bundle["GPU"] = 1
        self.group = placement_group(
            [dict(bundle) for _ in range(cfg.ray.large.max)],
            strategy="PACK",
            name=f"{cfg.name}-phase2-prewarm",
        )

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
