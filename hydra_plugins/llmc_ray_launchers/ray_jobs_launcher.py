"""`hydra/launcher=ray_jobs`: the class Hydra scans for, and its ConfigStore entry.

Hydra instantiates only plugin classes defined under `hydra_plugins`; the work is done in
llmc_ray/launchers/ray_jobs.py.
"""
import llmc_ray.launchers.ray_jobs as _impl


class RayJobsLauncher(_impl.RayJobsLauncher):
    """Each sweep point as a Ray Job on an existing cluster (see llmc_ray.launchers.ray_jobs)."""


_impl.register()
