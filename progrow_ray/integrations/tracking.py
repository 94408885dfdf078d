"""MLflow tracking for the pipeline: one parent run, child runs for trials, phases and the baseline.

All calls go through ``MlflowClient`` with explicit run ids (no global active run), from the driver
only, so workers need no MLflow and any tracking URI works (sqlite file, or a server on a cluster).
Tracking never stops training: the first failure prints one warning and tracking is switched off for
the rest of the run.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# What each engine event logs. MLflow 3.17's charts pair a metric x-axis with a loss by *index* in the
# metric history, not by step, so every x metric is logged exactly where its loss is: ``flops`` and
# ``tokens`` with each evaluation (the x of ``val_loss``), ``train_flops`` and ``train_tokens`` with
# each training interval (the x of ``train_loss``).
EVENT_METRICS = {
    "train": {
        "train_loss": "train_loss",
        "lr": "lr",
        "tokens_per_s": "tokens_per_s",
        "batch_tokens": "batch_tokens",
        "train_tokens": "tokens",
        "train_flops": "flops",
        "flops_per_s": "flops_per_s",
        "mfu": "mfu",
        "world_size": "world_size",
        "moe_aux_loss": "moe_aux_loss",
        "moe_z_loss": "moe_z_loss",
        "moe_max_expert_fraction": "moe_max_expert_fraction",
    },
    "eval": {"val_loss": "val_loss", "tokens": "tokens", "flops": "flops"},
}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scrub(params: dict[str, Any]) -> dict[str, str]:
    """Params as strings, with any value that equals (or contains) a secret from the environment masked."""
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    out = {}
    for k, v in params.items():
        s = str(v)
        out[k] = "***" if any(sec in s for sec in secrets) else s[:6000]
    return out


ARM_TAG = "progrow.arm"  # progressive | baseline | fixed-size | search-<role>: what the saved views group by
# (one run per arm: a group of several runs would be averaged step by step)
PIPELINE_TAG = "progrow.pipeline"  # the pipeline's name: arms of different pipelines are not averaged
# Saved views of the experiment's runs page (MLflow 3.17 keeps them as experiment tags): runs grouped by
# arm, loss charts against a metric as x-axis. The UI opens one with ``viewStateShareKey=<key>``.
VIEWS = {  # key: (name, x metric, the charts shown)
    "loss-vs-flops": ("progressive vs baseline: val loss vs FLOPs", "flops", "^val_loss$"),
    "loss-vs-tokens": ("progressive vs baseline: val loss vs tokens", "tokens", "^val_loss$"),
    "train-loss-vs-flops": ("progressive vs baseline: train loss vs FLOPs", "train_flops", "^train_loss$"),
}


def view_tag(name: str, x_metric: str, charts: str, now_ms: int) -> str:
    import json

    keys = [{"mode": "tag", "groupByData": k} for k in (PIPELINE_TAG, ARM_TAG)]
    state = {
        "groupBy": {"aggregateFunction": "average", "groupByKeys": keys},
        "globalLineChartConfig": {
            "xAxisKey": "metric",
            "selectedXAxisMetricKey": x_metric,
            "lineSmoothness": 0,
        },
        "chartsSearchFilter": charts,
        "runsHiddenMode": "SHOW_ALL",
    }
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def default_tracking_uri(explicit: str | None, out: str) -> str:
    """``explicit`` (``--mlflow-uri``, ``mlflow.tracking_uri``), else MLFLOW_TRACKING_URI (Kubernetes),
    else a sqlite file in ``out`` (in the working directory when ``out`` is on S3)."""
    chosen = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    base = out if not out.startswith("s3://") else os.getcwd()
    return f"sqlite:///{os.path.abspath(base)}/mlflow.db"


def comparison_url(ui_base: str, experiment_id: str, view: str = "loss-vs-flops") -> str:
    """The experiment's runs page in chart mode, with the model-training sidebar and a saved view."""
    return (
        f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&compareRunsMode=CHART&viewStateShareKey={view}"
    )


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, log: Callable[[str], None] = print):
        self.tracking_uri, self.log, self.enabled = tracking_uri, log, True
        self.experiment_id: str | None = None
        self._lock = threading.RLock()
        try:
            self._probe(tracking_uri)
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return
        if exp is None or not any(k.startswith("mlflow.sharedViewState.") for k in exp.tags):
            try:
                self._add_views(has_note=exp is not None and "mlflow.note.content" in exp.tags)
            except Exception as e:  # noqa: BLE001  (a server that refuses the tags still tracks runs)
                self.log(
                    f"warning: MLflow did not take the comparison views ({type(e).__name__}); runs are "
                    f"tracked"
                )

    def _add_views(self, has_note: bool) -> None:
        """Mark the experiment as model training (not GenAI) and add the comparison views."""
        now = int(time.time() * 1000)
        self.client.set_experiment_tag(
            self.experiment_id, "mlflow.experimentKind", "custom_model_development"
        )
        for i, (key, (name, x, charts)) in enumerate(VIEWS.items()):
            self.client.set_experiment_tag(
                self.experiment_id, f"mlflow.sharedViewState.{key}", view_tag(name, x, charts, now + i)
            )
        if has_note:  # the user's own description stays
            return
        self.client.set_experiment_tag(
            self.experiment_id,
            "mlflow.note.content",
            (
                "Progressive depth training runs (progrow_ray). Each pipeline is a parent run; the children "
                "that carry "
                f"a whole curve are tagged `{ARM_TAG}` (progressive, baseline, fixed-size, search-<probe>). "
                f"Open the saved view "
                f"'{VIEWS['loss-vs-flops'][0]}' (Views menu, chart mode) to compare the arms on compute."
            ),
        )

    @staticmethod
    def _probe(uri: str, timeout_s: float = 5.0) -> None:
        """A server that does not answer fails here in seconds, not after MLflow's minutes of HTTP retries."""
        import urllib.error
        import urllib.request

        if not uri.startswith(("http://", "https://")):
            return
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
        except urllib.error.HTTPError:
            return  # it answered (auth, proxy, no /health): let the client decide
        except OSError as e:
            raise ConnectionError(f"no answer from {uri}") from e

    def _fail(self, e: Exception) -> None:
        if self.enabled:
            self.log(
                f"warning: MLflow at {self.tracking_uri} is unavailable ({type(e).__name__}); "
                "training continues without tracking"
            )
        self.enabled = False

    def _call(self, method: str, *args, **kwargs):
        """``self.client.<method>(...)``, or None once tracking is off (MLflow unreachable). One call at a
        time: the phases' live streams log from driver threads (and sqlite takes one writer)."""
        with self._lock:
            if not self.enabled:
                return None
            fn = getattr(self.client, method)
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
                return None

    def last_step(self, run_id: str | None, key: str) -> int:
        """The highest step the run has a value of ``key`` at (-1: none, or tracking is off)."""
        if not run_id:
            return -1
        return max((m.step for m in self._call("get_metric_history", run_id, key) or []), default=-1)

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        if not run_id:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self._call("log_batch", run_id, tags=items)

    def start_run(
        self, name: str, tags: dict | None = None, params: dict | None = None, parent_id: str | None = None
    ) -> str | None:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call("create_run", self.experiment_id, tags=tags, run_name=name)
        if run is None:
            return None
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str | None, params: dict) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in scrub(flatten(params)).items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", run_id, params=items[i : i + 100])

    def log_history(self, run_id: str | None, history: Iterable[dict], step_offset: int = 0) -> None:
        """Metric events (engine format) against the global step, with their x metrics (EVENT_METRICS),
        so the UI can chart loss against compute."""
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for e in history:
            step = int(e.get("step", 0)) + step_offset
            ts = int(e.get("time", now / 1000) * 1000)
            for name, k in EVENT_METRICS.get(e.get("event"), {}).items():
                v = e.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics.append(Metric(name, float(v), ts, step))
        for i in range(0, len(metrics), 900):
            self._call("log_batch", run_id, metrics=metrics[i : i + 900])

    def log_metrics(self, run_id: str | None, values: dict[str, Any], step: int = 0) -> None:
        """Summary numbers (final losses, FLOPs fraction, ...) at one step; None values are left out."""
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if items:
            self._call("log_batch", run_id, metrics=items)

    def log_artifact(self, run_id: str | None, path: str) -> None:
        if run_id:
            self._call("log_artifact", run_id, path)

    def log_files(self, run_id: str | None, files: dict[str, bytes]) -> None:
        """Artifacts from memory: ``{file name: contents}``."""
        if not run_id:
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                path = os.path.join(tmp, name)
                with open(path, "wb") as fh:
                    fh.write(data)
                self.log_artifact(run_id, path)

    def log_image(self, run_id: str | None, png: bytes, key: str) -> None:
        """A figure the run page shows under "Model metrics" (log_artifact only lists the file)."""
        if not run_id:
            return
        import io

        from PIL import Image

        with Image.open(io.BytesIO(png)) as img:
            self._call("log_image", run_id, img.convert("RGB"), key=key, step=0)

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._call("set_terminated", run_id, status)
