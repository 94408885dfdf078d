import subprocess
import sys


def test_core_imports_no_ray_mlflow_or_s3fs():
    code = ("import sys, progrow_ray.core, progrow_ray.core.flops, progrow_ray.core.mixing, "
            "progrow_ray.core.diagnostics; "
            "bad = {'ray', 'mlflow', 's3fs'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
