"""Bad-input matrix: every mistake a user can make on the command line gives exactly one line naming
the field and the fix, exit code 2, no traceback, and nothing of the run written."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..orchestration.test_pipeline import ENV, ROOT, TINY, free_port
from ..s3 import CREDENTIALS

pytestmark = pytest.mark.slow
PIPE = [sys.executable, "-m", "progrow_ray.pipeline", "--config", str(TINY)]
TRAIN = [sys.executable, "-m", "progrow_ray.train", "--config", str(TINY)]

# (case, command, --set overrides, expected fragments of the one error line)
CASES = [
    ("unknown key", PIPE, ["train.typo=1"], ["unknown config key", "train.typo", "known under train"]),
    ("wrong type", PIPE, ["train.total_tokens=abc"], ["train.total_tokens must be an integer", "'abc'"]),
    ("negative size", PIPE, ["train.batch_tokens=-512"], ["train.batch_tokens must be > 0"]),
    ("zero size", PIPE, ["train.total_tokens=0"], ["train.total_tokens must be > 0"]),
    (
        "tau beyond decay start",
        PIPE,
        ["growth.tau_frac=0.95"],
        ["not before the decay start", "lower growth.tau_frac"],
    ),
    (
        "copying from 0 layers",
        PIPE,
        ["growth.method=copying"],
        ["cannot copy from a 0-layer model", "use 'random'"],
    ),
    ("target below source", PIPE, ["growth.source_depth=5"], ["below the source depth 5"]),
    (
        "batch not whole sequences",
        PIPE,
        ["train.batch_tokens=1000"],
        ["train.batch_tokens (1000) must be a multiple of data.seq_len (32)", "e.g. 992"],
    ),
    (
        "fewer micro-batches than workers",
        PIPE,
        ["ray.workers_large=[2,5]"],
        ["growth.batch_tokens_after (1024) has 4 micro-batch(es)", "fewer than the 5 workers"],
    ),
    (
        "worker range upside down",
        PIPE,
        ["ray.workers_small=[3,1]"],
        ["ray.workers_small must be a count >= 1 or [min, max] with 1 <= min <= max, got [3, 1]"],
    ),
    (
        "phase-2 batch below phase 1",
        PIPE,
        ["growth.batch_tokens_after=256"],
        ["growth.batch_tokens_after (256) must be >="],
    ),
    ("unknown model kind", PIPE, ["model.kind=rnn"], ["model.kind must be one of", "'rnn'"]),
    ("unknown optimizer", PIPE, ["optimizer.name=sgd"], ["optimizer.name must be one of", "'sgd'"]),
    ("negative learning rate", TRAIN, ["optimizer.lr=-1"], ["optimizer.lr must be > 0"]),
    ("unknown growth method", PIPE, ["growth.method=magic"], ["growth.method must be one of"]),
    (
        "vocab below the tokenizer's",
        PIPE,
        ["model.vocab_size=1000"],
        ["model.vocab_size (1000)", "use >= 50257"],
    ),
    (
        "context beyond block size",
        PIPE,
        ["model.block_size=16"],
        ["data.seq_len (32) exceeds model.block_size (16)"],
    ),
    ("warmup fraction", PIPE, ["schedule.warmup_frac=1.5"], ["schedule.warmup_frac must be in [0, 1)"]),
    ("search fraction", PIPE, ["tune.search_fraction=2"], ["tune.search_fraction must be in (0, 1]"]),
    (
        "streamed blocks without a cache bound",
        PIPE,
        ["data.block_shards=4"],
        ["data.block_shards streams shards through the node cache", "set data.cache_max_gb"],
    ),
    (
        "search over its budget",
        PIPE,
        ["tune.search_fraction=0.05"],
        ["the tau search does not fit its budget", "cost up to", "over tune.search_fraction=5.0%"],
    ),
    ("unknown reuse policy", PIPE, ["tune.reuse=sometimes"], ["tune.reuse must be one of"]),
    (
        "reuse only, registry empty",
        PIPE,
        ["tune.reuse=only"],
        ["tune.reuse=only: the mixing-time registry", "has no t_mix for this run's fingerprint"],
    ),
    (
        "no-saving policy",
        PIPE,
        ["tune.on_no_saving=maybe"],
        ["tune.on_no_saving must be 'fixed' or 'expand'"],
    ),
    (
        "bad growth stage",
        TRAIN,
        ["model.n_layer=3", "growth.stages=[{{depth: 1, tau_frac: 0.9}}]"],
        ["strictly increase"],
    ),
    ("malformed --set", PIPE, ["train.total_tokens"], ["--set takes key=value"]),
    (
        "missing data",
        PIPE,
        ["data.source={tmp}/missing", "data.uri={tmp}/shards"],
        ["data.source", "no input files"],
    ),
    (
        "empty corpus",
        PIPE,
        ["data.source={tmp}/empty", "data.uri={tmp}/shards"],
        ["data.source", "no input files"],
    ),
    (
        "unwritable data.uri",
        PIPE,
        ["data.uri=/dev/null/shards"],
        ["data.uri /dev/null/shards: cannot write there"],
    ),
    (
        "workers beyond the cluster",
        PIPE,
        ["ray.cpus_per_worker=3"],
        [
            "ray.workers_large=2 needs 2 worker(s) of 3 CPU but this local cluster holds 1",
            "raise ray.local_cpus",
        ],
    ),
    ("NaN loss", TRAIN, ["optimizer.lr=1e30"], ["non-finite training loss", "Lower optimizer.lr"]),
    ("unknown parallel mode", TRAIN, ["train.parallel=tp"], ["train.parallel must be auto, ddp or fsdp"]),
    (
        "phase beyond GPU memory, fsdp fits",
        PIPE,
        ["ray.use_gpu=true", "train.parallel=ddp", "ray.gpu_memory_gb=0.18"],
        [
            "memory preflight: phase 1 (depth 0 on 1 GPUs, ddp) needs 0.184 GB per GPU",
            "over ray.gpu_memory_gb=0.18",
            "set train.parallel=fsdp",
        ],
    ),
    (
        "phase beyond GPU memory, nothing fits",
        PIPE,
        ["ray.use_gpu=true", "ray.gpu_memory_gb=0.1"],
        ["memory preflight: phase 1", "over ray.gpu_memory_gb=0.1", "lower train.micro_batch"],
    ),
]


def run_case(cmd, sets, tmp, env=None, extra=()):
    # the prepared test corpus (a no-op prepare), unless a case brings its own data settings
    args = list(cmd) + ["--set", f"data.source={tmp}/corpus", "--set", f"data.uri={tmp}/shared-shards"]
    for s in sets:
        args += ["--set", s.format(tmp=tmp)]
    out = tmp / "out"
    args += ([f"--out={out}"] if cmd is PIPE else ["--set", f"out={out}"]) + list(extra)
    return subprocess.run(args, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300), out


def check_one_line(p, fragments):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]


def nothing_of_the_run(out: Path) -> bool:
    """No run state, checkpoints or reports: at most an empty output directory (or a metrics log)."""
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    return all(p.name == "metrics.jsonl" for p in files)


@pytest.fixture
def tmp(tmp_path, prepared, text_corpus):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corpus").symlink_to(text_corpus)
    shutil.copytree(prepared, tmp_path / "shared-shards")
    return tmp_path


@pytest.mark.parametrize("case,cmd,sets,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_exit_2(case, cmd, sets, fragments, tmp):
    p, out = run_case(cmd, sets, tmp)
    check_one_line(p, fragments)
    assert nothing_of_the_run(out), sorted(str(x) for x in out.rglob("*"))


def test_missing_and_malformed_config_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nmodel: [unclosed\n")
    for path, fragment in (
        (tmp_path / "nope.yaml", "no such file"),
        (tmp_path / "bad.yaml", "not valid YAML"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "progrow_ray.pipeline", "--config", str(path)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        check_one_line(p, [str(path), fragment])


@pytest.mark.cluster
def test_storage_that_cannot_be_reached_fails_before_training(tmp, s3_endpoint):
    # a bucket that does not exist (moto serves S3), then an endpoint where nothing listens
    env = {**ENV, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    p, _ = run_case(PIPE, [], tmp, env=env, extra=["--out=s3://no-such-bucket/runs"])
    check_one_line(p, ["out s3://no-such-bucket/runs", "does not exist", "create it"])
    dead = {**ENV, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    p, _ = run_case(PIPE, [], tmp, env=dead, extra=["--out=s3://runs/x"])
    check_one_line(p, ["run storage is not reachable", "check the endpoint and credentials"])
    assert (
        "Started a local Ray instance" not in p.stderr + p.stdout
    )  # before any cluster, before any training


def test_tampered_tokenizer_files_are_refused(tmp_path):
    from progrow_ray.core import ConfigError
    from progrow_ray.data.tokenizer import build_gpt2, gpt2_files

    vocab, encoder = gpt2_files()
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(Path(vocab).read_bytes().replace(b"\xc4\xa0t", b"\xc4\xa0T", 1))
    with pytest.raises(ConfigError, match="fail tiktoken's sha256 check"):
        build_gpt2(str(bad), encoder)
