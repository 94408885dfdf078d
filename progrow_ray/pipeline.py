"""``python -m progrow_ray.pipeline [--config jobs/X.yaml] [--set key=value ...] [--out DIR]``

The product's main job (also ``ray job submit -- python -m progrow_ray.pipeline ...``):
data -> τ search (Ray Tune) -> phase 1 (Ray Train, small model, few workers) -> expand + scale
-> phase 2 (more workers, larger batch) -> fixed-size baseline -> report + MLflow.

Re-running the same command (same ``name`` and ``out``) resumes: finished stages are skipped and an
interrupted phase resumes from its last committed checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .cli import RunFailed, run_cli
from .console import Console
from .core.errors import ConfigError, require
from .engine.config import load_run_config, to_dict
from .integrations.tracking import ARM_TAG, PIPELINE_TAG
from .integrations.storage import check_writable, is_s3, join, ray_storage, read_json, write_bytes, write_json
from .orchestration.config import PipelineConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "smoke.yaml"
STATE = "pipeline_state.json"
# Sections that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("ray", "mlflow")


def absolutize(cfg: PipelineConfig) -> PipelineConfig:
    """Workers run in other directories (and on other nodes): local paths must be absolute."""
    from dataclasses import replace

    data = cfg.data
    if "://" not in data.uri:
        data = replace(data, uri=os.path.abspath(data.uri))
    if data.source not in ("stdlib",) and "://" not in data.source:
        data = replace(data, source=os.path.abspath(data.source))
    out = cfg.out if is_s3(cfg.out) else os.path.abspath(cfg.out)
    return replace(cfg, data=data, out=out)


def tracking_uri(cfg: PipelineConfig, override: str | None) -> str:
    """--mlflow-uri, else mlflow.tracking_uri, else MLFLOW_TRACKING_URI (Kubernetes), else a sqlite file."""
    chosen = override or cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    base = cfg.out if not is_s3(cfg.out) else os.getcwd()
    return f"sqlite:///{os.path.abspath(base)}/mlflow.db"


def free_port() -> int:
    import socket

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


def init_ray(cfg: PipelineConfig, address: str | None, log) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, or start a local cluster. Returns True if we started it.

    Ray Train's placement-group cleaner (a detached actor that removes a run's placement groups when
    its controller dies) finds the cluster through the state API: RAY_API_SERVER_ADDRESS, else
    RAY_ADDRESS, else ``/tmp/ray/ray_current_cluster`` or a scan of every raylet on the machine. The
    last two fail ("Found multiple active Ray instances", or a 40-s GCS time-out on a stale file) where
    other clusters run or ran, and the cleaner then never cleans up. So the job's runtime environment
    names this cluster explicitly, for every process of the job."""
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(cfg.ray.worker_start_timeout_s)))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with RunConfig(verbose=0) Tune prints no tables
    target = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    if target:
        where = {"RAY_API_SERVER_ADDRESS": api} if api else ({"RAY_ADDRESS": target} if target != "auto" else {})
        # Ray refuses a key that the submitted job's own runtime env already sets (even to the same value)
        where = {k: v for k, v in where.items() if k not in job_env_vars()}
        ray.init(address=target, log_to_driver=True, runtime_env={"env_vars": where} if where else None)
        log(f"== Ray: connected to Ray at {target}")
        return False
    for attempt in range(2):  # the free port may be taken between the probe and Ray's bind: once more
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        try:
            ray.init(address="local", num_cpus=cfg.ray.local_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}})
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt:
                raise
    os.environ["RAY_API_SERVER_ADDRESS"] = api  # the driver's own state-API calls, too
    log(f"== Ray: started a local cluster ({cfg.ray.local_cpus} logical CPUs; dashboard {api})")
    return True


def check_capacity(cfg: PipelineConfig, local: bool) -> None:
    """On a fixed-size (local) cluster, workers beyond its resources would wait forever: fail now."""
    import ray

    if not local:
        return
    res = ray.cluster_resources()
    workers = cfg.ray.workers_large + (cfg.ray.workers_small if cfg.ray.standby and cfg.growth.enabled else 0)
    need_cpu = workers * cfg.ray.cpus_per_worker
    what = (f"ray.workers_large={cfg.ray.workers_large}" +
            (f" + ray.workers_small={cfg.ray.workers_small} (ray.standby)" if workers > cfg.ray.workers_large else ""))
    require(need_cpu <= res.get("CPU", 0),
            f"{what} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} needs {need_cpu:g} CPUs but the cluster has "
            f"{res.get('CPU', 0):g}; lower them, raise ray.local_cpus, or set ray.standby=false")
    require(not cfg.ray.use_gpu or workers <= res.get("GPU", 0),
            f"ray.use_gpu with {what} needs {workers} GPUs; the cluster has {res.get('GPU', 0):g}"
            + ("; or set ray.standby=false" if workers > cfg.ray.workers_large else ""))


class Pipeline:
    def __init__(self, cfg: PipelineConfig, mlflow_uri: str | None, console: Console | None = None):
        self.console = console or Console()
        self.cfg, self.log = cfg, self.console.info
        self.board = None  # live progress from the workers (orchestration.progress), set in run()
        self.root = join(cfg.out, cfg.name)
        self.storage_path, self.storage_fs = ray_storage(join(cfg.out, cfg.name, "ray"))
        self.state = read_json(join(self.root, STATE)) or {}
        self.tracking_uri = tracking_uri(cfg, mlflow_uri)

    @property
    def pipeline_tag(self) -> str:
        """What the comparison views group by besides the arm: this pipeline run, not every run of its name."""
        parent = self.state.get("mlflow_parent_run_id")
        return f"{self.cfg.name} {parent[:8]}" if parent else self.cfg.name

    # ---- state ----------------------------------------------------------------------------------
    def save_state(self) -> None:
        write_json(join(self.root, STATE), self.state)

    def check_same_run(self) -> None:
        saved = self.state.get("config")
        if not saved:
            return
        now = to_dict(self.cfg)
        diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k))
        require(not diff, f"run {self.cfg.name!r} in {self.cfg.out} exists with a different config ({', '.join(diff)} "
                          "changed); use another name (--set name=...) or the original config")

    # ---- stages ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from .integrations.tracking import Tracker
        from .train import prepare_data

        cfg = self.cfg
        self.check_same_run()
        self.state.setdefault("config", to_dict(cfg))
        self.save_state()
        from .orchestration.progress import make_board

        self.board = make_board()
        tracker = Tracker(self.tracking_uri, cfg.mlflow.experiment, log=self.log)
        parent = self.state.get("mlflow_parent_run_id") or tracker.start_run(
            cfg.name, tags={"progrow.kind": "pipeline"}, params=to_dict(cfg))
        self.state["mlflow_parent_run_id"] = parent
        self.save_state()
        self.tracker, self.parent = tracker, parent

        prepare_data(cfg, log=lambda _: None)  # a no-op after main() prepared it; kept for library callers
        search = self.state.get("tau_search") or self.search()
        expand, tau = search["expand"], search["tau_tokens"]
        run_cfg = self.main_run_overrides(search)
        phases = []
        if expand:
            phases = self.progressive(run_cfg, tau)
        else:  # the verdict says train fixed-size: the main run is the target model from the start
            phases = [self.phase("fixed", {**run_cfg, "growth": {"enabled": False}}, workers=cfg.fixed_size_workers())]
        baseline = None
        if cfg.baseline.enabled:
            baseline = self.phase("baseline", {**run_cfg, "growth": {"enabled": False}}, workers=cfg.ray.workers_large,
                                  tags={"progrow.phase": "baseline"})
        for name in self.state.get("phases", {}):
            self.track_phase(name)
        self.track_progressive()
        report = self.report(search, phases, baseline)
        self.state["done"] = True
        self.save_state()
        tracker.end(parent)
        return report

    def main_run_overrides(self, search: dict) -> dict:
        over: dict = {"growth": {"tau_tokens": search["tau_tokens"], "tau_frac": None}}
        lr = self.state.get("lr_search", {}).get("best_lr")
        if lr:
            over["optimizer"] = {"lr": lr}
        return over

    def search(self) -> dict:
        from .orchestration.tune_tau import search_lr, search_tau

        cfg = self.cfg
        if cfg.tune.lr_search.enabled and "lr_search" not in self.state:
            lr = search_lr(cfg, storage_path=self.storage_path, storage_filesystem=self.storage_fs,
                           run_name=f"{cfg.name}-lr-search", log=self.log)
            self.state["lr_search"] = lr
            self.save_state()
            self.log(f"lr search: best lr {lr['best_lr']:.4g}")
            from dataclasses import replace

            cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=lr["best_lr"]))
        if cfg.tune.enabled:
            self.console.stage("τ search (Ray Tune): probes measure the mixing time")
        if not cfg.tune.enabled:
            tau = cfg.tau_tokens
            verdict = (f"tau set by the config: {tau:,} tokens (no search)" if tau else
                       "growth.enabled=false: the target model trains at full depth from the start (no search)")
            result = {"t_mix_tokens": None, "tau_tokens": tau, "expand": tau is not None and tau > 0,
                      "verdict": verdict, "search_flops": 0.0, "trials": []}
        else:
            live: dict = {}

            def on_start(roles: list[str], cap: int) -> None:
                live["line"] = self.console.progress("search", cap * len(roles))
                live["tokens"] = dict.fromkeys(roles, 0)
                live["note"] = f"{len(roles)} probes"

            def on_result(role: str, r: dict) -> None:
                live["tokens"][role] = max(live["tokens"][role], r.get("tokens", 0))
                loss = r.get("train_loss") if role == "fixed" else None
                live["line"].update(sum(live["tokens"].values()), loss=loss, note=live["note"])

            try:
                result = search_tau(cfg, storage_path=self.storage_path, storage_filesystem=self.storage_fs,
                                    run_name=f"{cfg.name}-tau-search", log=self.console.note, on_start=on_start,
                                    on_result=on_result)
            finally:
                if "line" in live:
                    live["line"].close()
            for trial in result["trials"]:
                rid = self.tracker.start_run(f"search-{trial['role']}", parent_id=self.parent,
                                             tags={"progrow.phase": "tau-search", "progrow.role": trial["role"],
                                                   ARM_TAG: f"search-{trial['role']}", PIPELINE_TAG: self.pipeline_tag})
                self.tracker.log_history(rid, [{"event": "train", "step": i, "tokens": c["tokens"], "flops": c["flops"],
                                                "train_loss": c["train_loss"]} for i, c in enumerate(trial["curve"])])
                self.tracker.end(rid)
        self.log(f"verdict: {result['verdict']}")
        result = self.apply_no_saving_policy(result)
        self.state["tau_search"] = result
        self.save_state()
        return result

    def progressive(self, run_cfg: dict, tau: int) -> list[dict]:
        """Phase 1 until τ, then phase 2. With ``ray.standby`` phase 2's fit starts alongside phase 1:
        its workers start, import and join their process group, then wait for phase 1's checkpoint, so
        the switch at τ costs a checkpoint read and the expansion instead of a worker-group start."""
        import threading

        from .orchestration.phases import write_handoff

        cfg, done = self.cfg, self.state.get("phases", {})
        standby = cfg.ray.standby and "phase1" not in done and "phase2" not in done
        if not standby:
            # phase 1 goes to MLflow once phase 2 runs: nothing but Ray stands between tau and phase 2
            p1 = self.phase("phase1", run_cfg, workers=cfg.ray.workers_small, until=tau, prewarm=True, track=False)
            p2 = self.phase("phase2", run_cfg, workers=cfg.ray.workers_large, start_from=p1["checkpoint_path"])
            return [p1, p2]
        handoff = {"path": f"{self.storage_path}/{cfg.name}-phase2-handoff.json", "filesystem": self.storage_fs}
        outcome: dict = {}

        def run_phase2() -> None:
            try:
                outcome["p2"] = self.phase("phase2", run_cfg, workers=cfg.ray.workers_large, handoff=handoff,
                                           announce=False)
            except BaseException as e:  # re-raised on the driver's main thread
                outcome["error"] = e

        thread = threading.Thread(target=run_phase2, name="phase2-standby", daemon=True)
        thread.start()
        try:
            p1 = self.phase("phase1", run_cfg, workers=cfg.ray.workers_small, until=tau, track=False,
                            note=f"phase 2 waits on {cfg.ray.workers_large} standby worker(s)")
        except BaseException as e:
            write_handoff(handoff["path"], handoff["filesystem"], {"abort": f"phase 1 failed: {type(e).__name__}"})
            thread.join(timeout=60)
            raise
        write_handoff(handoff["path"], handoff["filesystem"], {"checkpoint_path": p1["checkpoint_path"]})
        self.announce("phase2", run_cfg, cfg.ray.workers_large)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return [p1, outcome["p2"]]

    def apply_no_saving_policy(self, result: dict) -> dict:
        """``tune.on_no_saving=expand``: expand at the configured τ although the verdict says fixed-size."""
        cfg = self.cfg
        if result["expand"] or cfg.tune.on_no_saving != "expand":
            return result
        from .orchestration.tune_tau import align_tau

        tau = align_tau(cfg.tau_tokens, cfg.train.batch_tokens, cfg.phase2_batch_tokens, cfg.train.total_tokens)
        note = (f"tune.on_no_saving=expand: expanding anyway at the configured tau = {tau:,} tokens "
                f"({tau / cfg.train.total_tokens:.0%} of the horizon)")
        self.log(note)
        return {**result, "expand": True, "tau_tokens": tau, "verdict_expand": False,
                "verdict": f"{result['verdict']} -- {note}"}

    def announce(self, name: str, overrides: dict, workers: int, note: str = "") -> None:
        """The stage header of a phase: what trains where, on which batch, up to where."""
        from .orchestration.phases import run_config_dict

        run = run_config_dict(self.cfg, **overrides)
        batch = (run["growth"].get("batch_tokens_after") if name == "phase2" else None) or run["train"]["batch_tokens"]
        what = {"phase1": "phase 1: the source model until τ", "phase2": "phase 2: expanded to the target depth",
                "fixed": "main run: the target model (fixed size)", "baseline": "baseline: the fixed-size target model"}
        self.console.stage(f"{what.get(name, name)} -- {workers} worker(s), global batch {batch:,} tokens"
                           + (f"; {note}" if note else ""))

    def phase(self, name: str, overrides: dict, *, workers: int, until: int | None = None,
              start_from: str | None = None, prewarm: bool = False, tags: dict | None = None,
              track: bool = True, handoff: dict | None = None, announce: bool = True, note: str = "") -> dict:
        from ray.train import Checkpoint

        from .orchestration.phases import run_config_dict, run_phase
        from .orchestration.progress import watch
        from .report import own_events
        from .orchestration.prewarm import PhaseTwoPrewarm

        if name in self.state.get("phases", {}):
            self.log(f"{name}: done earlier, skipped")
            return self.state["phases"][name]
        cfg = self.cfg
        run = run_config_dict(cfg, **overrides)
        if announce:
            self.announce(name, overrides, workers, note)
        start_ckpt = Checkpoint(start_from, self.storage_fs) if start_from else None
        warm = PhaseTwoPrewarm(cfg) if (prewarm and cfg.ray.prewarm) else None
        first = self.state.get("phases", {}).get("phase1", {}).get("tokens_end", 0) if name == "phase2" else 0
        if name == "phase2" and not first:  # standby: phase 1 has not finished yet, phase 2 starts at τ
            first = run["growth"].get("tau_tokens") or 0
        end = until or cfg.train.total_tokens
        try:
            with watch(self.board, name, self.console, start_tokens=first, end_tokens=end):
                outcome = run_phase(name, run, workers=workers, storage_path=self.storage_path,
                                    storage_filesystem=self.storage_fs, ray_cfg=cfg.ray, until_tokens=until,
                                    start_from=start_ckpt, handoff=handoff, run_name=f"{cfg.name}-{name}",
                                    board=self.board)
        finally:
            if warm is not None:
                warm.release()
        r = outcome.result
        start = self.state.get("phases", {}).get("phase1", {}) if name == "phase2" else {}
        checkpoint_uri = outcome.checkpoint_path
        if checkpoint_uri and self.storage_fs is not None and not checkpoint_uri.startswith("s3://"):
            checkpoint_uri = f"s3://{checkpoint_uri}"
        summary = {
            "name": name, "depth": r["depth"], "workers": workers, "global_batch_tokens": outcome.batch_tokens,
            "tokens": r["tokens"] - start.get("tokens_end", 0), "tokens_end": r["tokens"],
            "flops": r["flops"] - start.get("flops_end", 0.0), "flops_end": r["flops"], "final_train_loss": r["train_loss"],
            "final_val_loss": r["val_loss"], "checkpoint_uri": checkpoint_uri, "checkpoint_path": outcome.checkpoint_path,
            "fit_s": outcome.fit_s, "end_time": outcome.end_time,
            # phase 2 resumes phase 1's checkpoint, whose history it carries: keep only its own events
            "history": own_events(outcome.history, self.state.get("phases", {}).get("phase1", {}).get("history", [])
                                  if name == "phase2" else []),
        }
        if name == "phase2":
            expand = [e for e in outcome.history if e.get("event") == "expand"]
            phase1_end = self.state["phases"]["phase1"]["end_time"]
            summary["phase_switch_s"] = (expand[-1]["time"] - phase1_end) if expand else None
            if expand and outcome.handoff_time:  # standby: phase 1's fit ends + handoff, then restore + expand
                summary["phase_switch_breakdown"] = {
                    "handoff_s": outcome.handoff_time - phase1_end,
                    "restore_and_expand_s": expand[-1]["time"] - outcome.handoff_time}
            elif expand:  # where the switch goes: the driver between fits, worker start-up, restore + expand
                summary["phase_switch_breakdown"] = {
                    "between_fits_s": outcome.fit_start_time - phase1_end,
                    "workers_start_s": outcome.loop_start_time - outcome.fit_start_time,
                    "restore_and_expand_s": expand[-1]["time"] - outcome.loop_start_time}
        # the arm a saved view groups by: phase 1 and 2 form the "progressive" run (track_progressive)
        arm = {"fixed": "fixed-size", "baseline": "baseline"}.get(name)
        arm_tags = {ARM_TAG: arm, PIPELINE_TAG: self.pipeline_tag} if arm else {}  # the rest stays out of the views
        summary["mlflow"] = {"params": run, "tags": {"progrow.phase": name, "progrow.depth": r["depth"], **arm_tags,
                                                     "progrow.workers": workers, **(tags or {})}, "run_id": None}
        self.state.setdefault("phases", {})[name] = summary
        self.save_state()
        if track:
            self.track_phase(name)
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        self.console.detail(f"{name}: {r['tokens']:,} tokens, depth {r['depth']}, train loss {r['train_loss']:.4f}, "
                            f"val loss {val} ({outcome.fit_s:.0f} s)")
        return summary

    def track_phase(self, name: str) -> None:
        """One MLflow child run per phase, once (the run id is kept in the state file)."""
        summary = self.state["phases"][name]
        mlflow = summary.get("mlflow")
        if not mlflow or mlflow["run_id"]:
            return
        rid = self.tracker.start_run(name, parent_id=self.parent, params=mlflow["params"], tags=mlflow["tags"])
        self.tracker.log_history(rid, summary["history"])
        self.tracker.end(rid)
        mlflow["run_id"] = rid or "disabled"
        self.save_state()

    def track_progressive(self) -> None:
        """One child run "progressive" with both phases' curves: the progressive arm of the comparison
        views (phase1 and phase2 keep their own runs, with their params and workers)."""
        from .report import own_events

        phases = self.state.get("phases", {})
        if "phase2" not in phases or self.state.get("mlflow_progressive_run_id"):
            return
        p1, p2 = phases["phase1"], phases["phase2"]
        rid = self.tracker.start_run("progressive", parent_id=self.parent, params=p2["mlflow"]["params"], tags={
            "progrow.phase": "phase1+phase2", ARM_TAG: "progressive", PIPELINE_TAG: self.pipeline_tag,
            "progrow.depth": f"{p1['depth']} -> {p2['depth']}", "progrow.workers": f"{p1['workers']} -> {p2['workers']}"})
        self.tracker.log_history(rid, p1["history"] + own_events(p2["history"], p1["history"]))
        self.tracker.end(rid)
        self.state["mlflow_progressive_run_id"] = rid or "disabled"
        self.save_state()

    # ---- report ---------------------------------------------------------------------------------
    def report(self, search: dict, phases: list[dict], baseline: dict | None) -> dict:
        from .report import markdown, plot_lines, render_png

        cfg = self.cfg
        last = phases[-1]
        prog_flops = sum(p["flops"] for p in phases)
        progressive = {"final_val_loss": last["final_val_loss"], "flops": prog_flops}
        base = {"final_val_loss": baseline["final_val_loss"], "flops": baseline["flops"]} if baseline else None
        savings = None
        if base:
            # the paper's eq. 1.1 count (non-embedding parameters only) of the same two runs, from the config
            fixed_cfg = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, enabled=False))
            main_cfg = cfg if len(phases) > 1 else fixed_cfg
            paper = main_cfg.run_flops("paper", tau_tokens=search["tau_tokens"]) / fixed_cfg.run_flops("paper")
            savings = {"flops_fraction": prog_flops / base["flops"], "flops_fraction_paper": paper,
                       "loss_gap_rel": (progressive["final_val_loss"] - base["final_val_loss"]) / base["final_val_loss"]}
        keep = ("name", "depth", "workers", "global_batch_tokens", "tokens", "flops", "final_train_loss", "checkpoint_uri")
        report = {
            "config": to_dict(cfg),
            "tau_search": {k: search.get(k) for k in ("t_mix_tokens", "tau_tokens", "verdict", "search_flops", "trials",
                                                      "expand", "verdict_expand", "cap_tokens",
                                                      "expand_at_tokens")},
            "lr_search": self.state.get("lr_search"),
            "horizon_note": no_saving_reason(cfg, search),
            "phases": [{k: p[k] for k in keep} for p in phases],
            "progressive": progressive,
            "baseline": base,
            "savings": savings,
            "overheads": {"phase_switch_s": phases[-1].get("phase_switch_s") if len(phases) > 1 else None,
                          "phase_switch_breakdown": phases[-1].get("phase_switch_breakdown") if len(phases) > 1 else None,
                          "search_flops_fraction": search["search_flops"] / prog_flops},
            "mlflow": {"tracking_uri": self.tracking_uri, "experiment_id": self.tracker.experiment_id,
                       "parent_run_id": self.parent},
        }
        files = {
            "report.json": json.dumps(report, indent=2, default=str).encode(),
            "report.md": markdown(report).encode(),
            "config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False).encode(),
        }
        runs = plot_runs(phases, baseline)
        for x in ("tokens", "flops"):
            files[f"loss_vs_{x}.png"] = render_png(plot_lines(runs, x), f"{cfg.name}: loss vs {x if x == 'tokens' else 'FLOPs'}")
            self.tracker.log_image(self.parent, files[f"loss_vs_{x}.png"], key=f"loss_vs_{x}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                write_bytes(join(self.root, name), data)
                local = os.path.join(tmp, name)
                Path(local).write_bytes(data)
                self.tracker.log_artifact(self.parent, local)
        self.tracker.log_metrics(self.parent, {
            "final_val_loss": progressive["final_val_loss"], "flops": prog_flops,
            "baseline_final_val_loss": base["final_val_loss"] if base else None,
            "flops_fraction": savings["flops_fraction"] if savings else None,
            "flops_fraction_paper": savings["flops_fraction_paper"] if savings else None,
            "loss_gap_rel": savings["loss_gap_rel"] if savings else None,
            "tau_tokens": search["tau_tokens"], "search_flops": search["search_flops"]})
        return report


# Paper §5: GPT-2 1 -> 12 layers under WSD mixes in about 16B tokens; t_mix is counted in tokens and
# hardly depends on the model's size (App. C.1), so it is the yardstick for a horizon that can save.
PAPER_T_MIX_TOKENS = 16e9


def no_saving_reason(cfg: PipelineConfig, search: dict) -> str | None:
    """When the search found no τ: one plain line on why this setting cannot show a saving, from the
    numbers (depth's share of the FLOPs, what the probes measured), and what would."""
    if search.get("verdict_expand", search.get("expand")) or not search.get("trials"):
        return None
    small, large = cfg.flops_per_unit()
    depth_share = 1 - small / large
    mix = search.get("mix") or {}
    measured = (f"within the probes' {search['cap_tokens']:,} tokens the target model beat the source model by only "
                f"{mix['depth_advantage_rel']:.1%}" if mix.get("depth_advantage_rel") is not None and search.get("cap_tokens")
                else "the probes measured no mixing")
    vocab = getattr(cfg.target_model_config(), "vocab_size", None)
    rest = f"embeddings and the {vocab:,}-token head" if vocab else "the stem and the head"
    return (f"the layers are {depth_share:.0%} of this model's training FLOPs (the rest is {rest}), "
            f"so growing depth can save at most that share "
            f"of the compute before τ, and {measured}; a saving needs depth to dominate the FLOPs (a wider, deeper "
            f"model) and a horizon well past the mixing time (the paper measures ≈{PAPER_T_MIX_TOKENS / 1e9:.0f}B "
            f"tokens for GPT-2 1 -> 12 layers), not {cfg.train.total_tokens:,} tokens")


def plot_runs(phases: list[dict], baseline: dict | None) -> dict[str, list[dict]]:
    """What the plots draw: the main run's phases (progressive, or fixed-size) and the baseline."""
    main = "progressive" if len(phases) > 1 else "fixed-size (main run)"
    runs = {main: phases}
    if baseline:
        runs["baseline"] = [baseline]
    return runs


def summary_table(report: dict, root: str) -> str:
    rows = [("verdict", report["tau_search"]["verdict"])]
    if report.get("horizon_note"):
        rows.append(("why", report["horizon_note"]))
    for p in report["phases"]:
        rows.append((p["name"], f"depth {p['depth']}, {p['workers']} worker(s), batch {p['global_batch_tokens']:,} tokens, "
                                f"{p['tokens']:,} tokens, train loss {p['final_train_loss']:.4f}"))
    rows.append(("progressive", f"val loss {report['progressive']['final_val_loss']:.4f}, FLOPs {report['progressive']['flops']:.3e}"))
    if report["baseline"]:
        b, s = report["baseline"], report["savings"]
        rows.append(("baseline", f"val loss {b['final_val_loss']:.4f}, FLOPs {b['flops']:.3e}"))
        rows.append(("savings", f"FLOPs fraction {s['flops_fraction']:.1%} ({s['flops_fraction_paper']:.1%} as the paper "
                                f"counts: non-embedding weights), val loss gap {s['loss_gap_rel']:+.2%}"))
    o = report["overheads"]
    rows.append(("overheads", f"search {o['search_flops_fraction']:.1%} of FLOPs, phase switch "
                              + (f"{o['phase_switch_s']:.1f} s" if o["phase_switch_s"] is not None else "-")))
    rows.append(("report", join(root, "report.json")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def log_path_for(cfg: PipelineConfig) -> str:
    """The run's log file: in the run directory when it is local, else a local file (S3 gets a copy)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = join(cfg.out, cfg.name) if not is_s3(cfg.out) else os.path.join(tempfile.gettempdir(), "progrow_ray", cfg.name)
    return os.path.join(base, "logs", f"pipeline-{stamp}.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m progrow_ray.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help=f"YAML preset (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="output directory or s3:// prefix (overrides `out`)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Tune's and the workers' own output on the console (else: in the log file)")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    config_path = args.config or DEFAULT_CONFIG
    cfg = load_run_config(config_path, overrides, cls=PipelineConfig)
    cfg = absolutize(cfg)
    started = time.time()
    from .train import prepare_data

    print(f"progrow_ray pipeline: {cfg.name} ({os.path.relpath(config_path) if not args.config else args.config}) "
          f"-> {join(cfg.out, cfg.name)}", flush=True)
    check_writable(cfg.out)  # cheap, so first: an unreachable store fails in seconds
    # the data is checked (and prepared once) before anything of the run is written
    prepare_data(cfg, log=lambda m: print(f"data: {m}", flush=True))
    pipeline = Pipeline(cfg, args.mlflow_uri)
    pipeline.check_same_run()
    if pipeline.state.get("done"):
        print(f"run {cfg.name!r} already finished; its report: {join(pipeline.root, 'report.json')}")
        report = read_json(join(pipeline.root, "report.json"))
        print_summary(report, cfg, started)
        return 0
    log_path = log_path_for(cfg)
    console = Console(log_path, verbose=args.verbose)
    run_started = False
    saved_api = os.environ.get("RAY_API_SERVER_ADDRESS")
    try:
        with console:
            console.info(f"log: {log_path}" + ("" if args.verbose else " (Ray's own output; --verbose shows it here)"))
            pipeline.console, pipeline.log = console, console.info
            import ray

            ours = not ray.is_initialized()
            local = init_ray(cfg, args.address, console)
            try:
                check_capacity(cfg, local)
                run_started = True
                report = pipeline.run()
            finally:
                if ours:  # inside the console: what Ray prints while shutting down goes to the log too
                    ray.shutdown()
                if saved_api is None:
                    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
                else:
                    os.environ["RAY_API_SERVER_ADDRESS"] = saved_api
    except ConfigError:
        if not run_started:  # a refused run leaves nothing behind, not even its log
            Path(log_path).unlink(missing_ok=True)
            for d in (Path(log_path).parent, Path(log_path).parent.parent):
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        raise
    except Exception as e:  # noqa: BLE001  (one line for the user; the traceback is in the log)
        import traceback

        with open(log_path, "a") as fh:
            traceback.print_exc(file=fh)
        raise RunFailed(f"{type(e).__name__}: {e}".splitlines()[0] + f" (full log: {log_path})") from e
    finally:
        if run_started and is_s3(cfg.out):
            upload_log(log_path, join(pipeline.root, "logs", os.path.basename(log_path)))
    print_summary(report, cfg, started)
    return 0


def upload_log(local: str, remote: str) -> None:
    """S3 runs keep their log beside the report, also when they failed; never changes the outcome."""
    try:
        write_bytes(remote, Path(local).read_bytes())
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not copy the run log to {remote} ({type(e).__name__}); it stays at {local}",
              file=sys.stderr)


def print_summary(report: dict, cfg: PipelineConfig, started: float) -> None:
    print(f"\nsummary ({time.time() - started:.0f} s):")
    print(summary_table(report, join(cfg.out, cfg.name)))
    from .integrations.tracking import comparison_url

    uri, exp = report["mlflow"]["tracking_uri"], report["mlflow"]["experiment_id"]
    if uri.startswith("sqlite:"):
        print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        print(f"\nMLflow runs: {uri} (experiment {exp})")
        base = uri
    if exp is not None:
        print(f"compare progressive vs baseline on FLOPs: {comparison_url(base, exp)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))

