"""Ray start-up for the pipeline and the reproduction suite: connect to a cluster or start a local one,
check that the phases fit on it, and shut down what we started."""

from __future__ import annotations

import json
import os
import socket

from ..core.errors import require


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env_vars() -> dict:
    """The env_vars of the runtime env a `ray job submit` gave this driver (none outside a job)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


class RaySession:
    """``with RaySession(address, local_cpus, log) as session:`` -- Ray for the duration of a command.

    Connects to ``address`` / RAY_ADDRESS, or starts a local cluster (``session.local``); on exit shuts
    down only what it started. Ray Train's placement-group cleaner (a detached actor that removes a run's
    placement groups when its controller dies) finds the cluster through the state API:
    RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else ``/tmp/ray/ray_current_cluster`` or a scan of every
    raylet on the machine. The last two fail ("Found multiple active Ray instances", or a 40-s GCS
    time-out on a stale file) where other clusters run or ran, and the cleaner then never cleans up. So
    the job's runtime environment names this cluster explicitly, for every process of the job."""

    def __init__(
        self, address: str | None, local_cpus: int, log=print, worker_start_timeout_s: float = 120.0
    ):
        self.address, self.local_cpus, self.log = address, local_cpus, log
        self.worker_start_timeout_s = worker_start_timeout_s
        self.local = False  # we started a local cluster
        self._ours = False  # we called ray.init (and shut down on exit)
        self._saved_api = os.environ.get("RAY_API_SERVER_ADDRESS")

    def __enter__(self) -> "RaySession":
        import ray

        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(self.worker_start_timeout_s)))
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with RunConfig(verbose=0) Tune prints no tables
        if ray.is_initialized():
            return self
        self._ours = True
        target = self.address or os.environ.get("RAY_ADDRESS")
        if target:
            self._connect(target)
        else:
            self._start_local()
        return self

    def _connect(self, target: str) -> None:
        import ray

        api = os.environ.get("RAY_API_SERVER_ADDRESS")
        where = (
            {"RAY_API_SERVER_ADDRESS": api} if api else ({"RAY_ADDRESS": target} if target != "auto" else {})
        )
        # Ray refuses a key that the submitted job's own runtime env already sets (even to the same value)
        where = {k: v for k, v in where.items() if k not in job_env_vars()}
        ray.init(address=target, log_to_driver=True, runtime_env={"env_vars": where} if where else None)
        self.log(f"== Ray: connected to Ray at {target}")

    def _start_local(self) -> None:
        import ray

        for attempt in range(2):  # the free port may be taken between the probe and Ray's bind: once more
            port = free_port()
            api = f"http://127.0.0.1:{port}"
            try:
                ray.init(
                    address="local",
                    num_cpus=self.local_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    log_to_driver=True,
                    runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}},
                )
                break
            except Exception:  # noqa: BLE001
                ray.shutdown()
                if attempt:
                    raise
        os.environ["RAY_API_SERVER_ADDRESS"] = api  # the driver's own state-API calls, too
        self.local = True
        self.log(f"== Ray: started a local cluster ({self.local_cpus} logical CPUs; dashboard {api})")

    def __exit__(self, *exc) -> None:
        import ray

        if self._ours:
            ray.shutdown()
        if self._saved_api is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = self._saved_api


def check_capacity(cfg, local: bool) -> None:
    """On a fixed-size (local) cluster, workers beyond its resources would wait forever: fail now."""
    import ray

    if not local:
        return
    res = ray.cluster_resources()
    workers = cfg.ray.workers_large + (cfg.ray.workers_small if cfg.ray.standby and cfg.growth.enabled else 0)
    need_cpu = workers * cfg.ray.cpus_per_worker
    what = f"ray.workers_large={cfg.ray.workers_large}" + (
        f" + ray.workers_small={cfg.ray.workers_small} (ray.standby)"
        if workers > cfg.ray.workers_large
        else ""
    )
    require(
        need_cpu <= res.get("CPU", 0),
        f"{what} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} needs {need_cpu:g} CPUs but the cluster has "
        f"{res.get('CPU', 0):g}; lower them, raise ray.local_cpus, or set ray.standby=false",
    )
    require(
        not cfg.ray.use_gpu or workers <= res.get("GPU", 0),
        f"ray.use_gpu with {what} needs {workers} GPUs; the cluster has {res.get('GPU', 0):g}"
        + ("; or set ray.standby=false" if workers > cfg.ray.workers_large else ""),
    )
