import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "progrow_ray.core, progrow_ray.core.flops, progrow_ray.core.mixing, progrow_ray.core.diagnostics",
        "progrow_ray.engine, progrow_ray.engine.trainer, progrow_ray.data.sampler, progrow_ray.data.prepare, "
        "progrow_ray.train, progrow_ray.bench.__main__, progrow_ray.data.cache, progrow_ray.data.__main__, "
        "progrow_ray.bench.stopper, progrow_ray.bench.prepare",
    ],
)
def test_core_and_engine_import_no_ray_mlflow_or_s3fs(modules):
    """They must run on a bare GPU box where only torch is installed."""
    code = f"import sys, {modules}; bad = {{'ray', 'mlflow', 's3fs'}} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
