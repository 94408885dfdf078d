"""Shared fixtures: a small real-text corpus (stdlib modules copied as .txt) prepared once."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CORPUS_MODULES = [
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "string.py",
    "csv.py",
    "fractions.py",
    "heapq.py",
    "bisect.py",
    "shlex.py",
    "glob.py",
    "fnmatch.py",
    "colorsys.py",
    "calendar.py",
    "statistics.py",
    "difflib.py",
    "pprint.py",
    "ipaddress.py",
    "argparse.py",
]


@pytest.fixture
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with AWS_* set in the environment for the test's duration."""
    from tests.s3 import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """~600 KB of real text in .txt files (no download)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / name, root / (name.replace("/", "_") + ".txt"))
    return root


@pytest.fixture(scope="session")
def prepared(text_corpus, tmp_path_factory) -> str:
    from progrow_ray.data.prepare import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("tokens") / "corpus"
    prepare(
        str(text_corpus), str(out), PrepareSettings(val_fraction=0.15), progress=False, log=lambda _: None
    )
    return str(out)
