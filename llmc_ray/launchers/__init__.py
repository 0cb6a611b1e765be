"""Hydra launchers and Ray Jobs helpers (`ray_jobs`: each sweep point as a Ray Job on an existing cluster)."""
