"""Hydra launchers (`ray_jobs`: each sweep point as a Ray Job on an existing cluster; `pipelined`: all points
through one set of loaded actors) and Ray Jobs helpers."""
