"""Hydra finds plugins in the `hydra_plugins` namespace package: this one adds `hydra/launcher=ray_jobs` and
`hydra/launcher=pipelined`."""
