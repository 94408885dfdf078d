"""Ray start-up for the pipeline and the reproduction suite: connect to a cluster or start a local one,
check that the phases fit on it, and shut down what we started."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from ..core.errors import ConfigError, require


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


class CapacityError(ConfigError):
    """The cluster cannot hold a phase's minimum workers: exit 2, state kept, the same command resumes."""


def workers_on(resources: dict, cpus_per_worker: float, gpu: bool) -> int:
    """Workers one node of ``resources`` holds: ``cpus_per_worker`` CPUs each, and a GPU with ``gpu``."""
    fit = int(resources.get("CPU", 0) // cpus_per_worker) if cpus_per_worker > 0 else 1 << 30
    return min(fit, int(resources.get("GPU", 0))) if gpu else fit


def placeable_workers(cpus_per_worker: float, gpu: bool) -> int:
    """How many workers of one phase the cluster's alive nodes can hold at once (each worker on one node:
    ``cpus_per_worker`` CPUs, and a GPU with ``ray.use_gpu``)."""
    import ray

    return sum(
        workers_on(node.get("Resources", {}), cpus_per_worker, gpu)
        for node in ray.nodes()
        if node.get("Alive")
    )


def autoscale_workers(cpus_per_worker: float, gpu: bool) -> int | None:
    """How many the cluster could hold at its autoscaler's maximum: autoscaler v2 (KubeRay, the cluster
    launcher) publishes its node groups and their max counts to the GCS. None without one. (Ray's
    ``GlobalState.get_cluster_config``: an internal API of the pinned Ray.)"""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001
        return None
    if config is None or not config.node_group_configs:
        return None
    total = 0
    for group in config.node_group_configs:
        per_node = workers_on(dict(group.resources), cpus_per_worker, gpu)
        if group.max_count == -1 and per_node:
            return 1 << 30  # unbounded
        total += max(group.max_count, 0) * per_node
    return total


def capacity(cfg) -> tuple[int, int | None]:
    """(workers the cluster holds now, workers it can autoscale to or None)."""
    r = cfg.ray
    return placeable_workers(r.cpus_per_worker, r.use_gpu), autoscale_workers(r.cpus_per_worker, r.use_gpu)


def phase_need(cfg, what: str, workers) -> str:
    per = f"{cfg.ray.cpus_per_worker:g} CPU" + (" + 1 GPU" if cfg.ray.use_gpu else "")
    return f"{what} needs at least {workers.min} worker(s) of {per}"


def wait_for_capacity(cfg, what: str, workers, log=print, poll_s: float = 2.0) -> None:
    """Return once the cluster holds ``workers.min`` workers; after ``ray.capacity_timeout_s`` without
    (an autoscaler had that long to add nodes), or at once when its autoscaler's maximum is below it,
    raise ``CapacityError`` with what is needed and what there is. Nothing is started before: the run's
    state stays as it was."""
    timeout = cfg.ray.capacity_timeout_s
    deadline = time.monotonic() + timeout
    said = False
    while True:
        have, most = capacity(cfg)
        if have >= workers.min:
            return
        can = f" and can autoscale to {most}" if most is not None else ""
        if most is not None and most < workers.min:
            raise CapacityError(
                f"{phase_need(cfg, what, workers)}; the cluster holds {have}{can}. Raise the autoscaler's "
                "maximum (maxReplicas) or lower the minimum"
            )
        if time.monotonic() >= deadline:
            raise CapacityError(
                f"{phase_need(cfg, what, workers)}; the cluster holds {have}{can} and did not grow within "
                f"ray.capacity_timeout_s={timeout:g} s. Add nodes (or let the autoscaler) and re-run the "
                "same command to resume, or lower the minimum"
            )
        if not said:
            log(f"{what}: waiting up to {timeout:g} s for capacity ({have} of {workers.min} worker(s))")
            said = True
        time.sleep(poll_s)


def stop_fit(board, stage: str) -> bool:
    """Stop the running fit of ``stage`` by killing its Ray Train controller (its rank 0 hands the handle
    to the board); ``fit()`` then raises on the driver, and Ray's placement-group cleaner frees its
    workers. Ray Train's own abort (its SIGINT handler) waits on the controller, which does not answer
    while it retries a worker-group start. Returns whether there was a controller to stop."""
    import ray

    handle = ray.get(board.controller.remote(stage), timeout=30) if board is not None else None
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    return True


class CapacityWatch:
    """During a fit: if the cluster stays below the phase's minimum for ``ray.capacity_timeout_s`` (a lost
    node nobody replaces; Ray itself would wait forever), stop the fit (``stop_fit``) and remember why."""

    def __init__(self, cfg, what: str, workers, board, log=print, poll_s: float = 2.0):
        self.cfg, self.what, self.workers, self.poll_s = cfg, what, workers, poll_s
        self.board, self.log = board, log
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capacity-{what}", daemon=True)

    def __enter__(self) -> "CapacityWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _run(self) -> None:
        below_since = None
        timeout = self.cfg.ray.capacity_timeout_s
        while not self._stop.wait(self.poll_s):
            try:
                have = placeable_workers(self.cfg.ray.cpus_per_worker, self.cfg.ray.use_gpu)
            except Exception:  # noqa: BLE001  (the GCS briefly unreachable: look again)
                continue
            if have >= self.workers.min:
                below_since = None
                continue
            below_since = below_since or time.monotonic()
            if time.monotonic() - below_since >= timeout:
                self.fired = (
                    f"{phase_need(self.cfg, self.what, self.workers)}; the cluster has held only {have} for "
                    f"ray.capacity_timeout_s={timeout:g} s, so the fit was stopped. Add nodes and re-run "
                    "the same command: it resumes from the last checkpoint"
                )
                self.log(
                    f"{self.what}: {have} of {self.workers.min} worker(s) for {timeout:g} s: stopping the fit"
                )
                try:
                    stopped = stop_fit(self.board, self.what)
                except Exception as e:  # noqa: BLE001
                    stopped, why = False, f"{type(e).__name__}: {e}"
                else:
                    why = "its workers never started"
                if not stopped:
                    self.log(f"warning: could not stop the fit of {self.what} ({why}); Ray keeps retrying")
                return


def check_capacity(cfg, local: bool) -> None:
    """A local cluster never grows: a phase whose minimum workers it cannot hold fails now. (A remote
    cluster gets ``ray.capacity_timeout_s`` at each phase, ``wait_for_capacity``.)"""
    if not local:
        return
    have = placeable_workers(cfg.ray.cpus_per_worker, cfg.ray.use_gpu)
    for key, workers in (("ray.workers_small", cfg.ray.small), ("ray.workers_large", cfg.ray.large)):
        require(
            workers.min <= have,
            f"{key}={workers} needs {workers.min} worker(s) of {cfg.ray.cpus_per_worker:g} CPU"
            + (" + 1 GPU" if cfg.ray.use_gpu else "")
            + f" but this local cluster holds {have}; lower it or raise ray.local_cpus",
        )


def standby_fits(cfg) -> bool:
    """Standby phase 2 holds both phases' workers during phase 1: only where the cluster (or its autoscaler
    at its maximum) has room for both at their maximum (else the two fits would wait on each other)."""
    have, most = capacity(cfg)
    return max(have, most or 0) >= cfg.ray.small.max + cfg.ray.large.max
