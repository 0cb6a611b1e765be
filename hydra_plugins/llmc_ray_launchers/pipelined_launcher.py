"""`hydra/launcher=pipelined`: the class Hydra scans for, and its ConfigStore entry; the work is done in
llmc_ray/launchers/pipelined.py."""
import llmc_ray.launchers.pipelined as _impl


class PipelinedLauncher(_impl.PipelinedLauncher):
    """Every sweep point through one set of loaded actors (see llmc_ray.launchers.pipelined)."""


_impl.register()
