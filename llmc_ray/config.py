"""Typed run configuration: Hydra composes YAML onto these dataclasses, `__post_init__` checks each section.

Nothing below the entry point sees a DictConfig: `from_hydra(cfg)` builds a `RunConfig` once. Checks that
need the model's shapes (group_size divides in_features, ...) live in `validate.py`, run before any actor starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

EVAL_POSITIONS = ("pretrain", "transformed", "fake_quant")
CALIB_NAMES = ("custom", "pileval", "wikitext2", "c4", "ptb")
EVAL_NAMES = ("custom", "wikitext2", "c4", "ptb")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
CALIB_ALGOS = ("minmax", "mse")
TARGETS = ("none", "tpu_mlir")
SCHEDULES = ("sequential", "parallel")
TRANSPORTS = ("auto", "collective", "object_store")
DTYPES = ("float32", "float16", "bfloat16", "auto")


class ConfigError(ValueError):
    """A user error in the configuration: the message says what to change."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    path: str = MISSING  # HF directory (config.json + safetensors) or a .gguf file
    type: Optional[str] = None  # adapter name; default: config.json's model_type
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        _require(self.torch_dtype in DTYPES, f"model.torch_dtype={self.torch_dtype!r}: use one of {DTYPES}")


@dataclass
class CalibConfig:
    name: str = "custom"
    path: Optional[str] = None  # txt / jsonl / dataset saved with save_to_disk / directory of .txt
    n_samples: int = 128
    seq_len: int = 512
    bs: int = 1  # samples per micro-batch handed between actors
    # an actor joins consecutive micro-batches into forwards of up to this many tokens before calibrating a
    # block (null: calibrate on bs-sample micro-batches as handed over). Bigger forwards mean fewer kernel
    # launches; the calibration math is the same (sums over all tokens), so only float rounding changes.
    merge_tokens: Optional[int] = 65536
    preproc: str = "general"
    seed: int = 42
    # custom text: which files/lines to take (lets calib and eval read disjoint parts of one corpus)
    select: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.name in CALIB_NAMES, f"calib.name={self.name!r}: use one of {CALIB_NAMES}")
        _require(self.n_samples > 0 and self.seq_len > 0 and self.bs > 0,
                 "calib.n_samples, calib.seq_len and calib.bs must be positive")
        _require(self.merge_tokens is None or self.merge_tokens > 0,
                 f"calib.merge_tokens={self.merge_tokens}: use a positive token count, or null to keep calib.bs")


@dataclass
class EvalConfig:
    name: str = "custom"
    path: Optional[str] = None
    seq_len: int = 2048
    bs: int = 1  # windows per eval micro-batch through the actor pipeline
    eval_pos: List[str] = field(default_factory=lambda: ["pretrain", "fake_quant"])
    num_samples: Optional[int] = None  # cap on eval windows (None: all)
    select: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.name in EVAL_NAMES, f"eval.name={self.name!r}: use one of {EVAL_NAMES}")
        bad = [p for p in self.eval_pos if p not in EVAL_POSITIONS]
        _require(not bad, f"eval.eval_pos has {bad}: allowed positions are {EVAL_POSITIONS}")
        _require(self.seq_len > 1 and self.bs > 0, "eval.seq_len must be > 1 and eval.bs > 0")


@dataclass
class WeightQuantConfig:
    bit: int = 4
    symmetric: bool = False
    granularity: str = "per_group"
    group_size: int = 128
    calib_algo: str = "minmax"

    def __post_init__(self) -> None:
        _require(2 <= self.bit <= 8, f"quant.weight.bit={self.bit}: integer weights take 2..8 bits")
        _require(self.granularity in GRANULARITIES,
                 f"quant.weight.granularity={self.granularity!r}: use one of {GRANULARITIES}")
        _require(self.calib_algo in CALIB_ALGOS,
                 f"quant.weight.calib_algo={self.calib_algo!r}: use one of {CALIB_ALGOS}")
        _require(self.granularity != "per_group" or self.group_size > 0,
                 "quant.weight.group_size must be > 0 with granularity=per_group")


@dataclass
class QuantConfig:
    method: str = "RTN"
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    special: Dict[str, Any] = field(default_factory=dict)  # method-specific; parsed by the method's dataclass
    quant_out: bool = False  # next block calibrates on this block's fake-quantized output


@dataclass
class SaveConfig:
    save_trans: bool = False
    save_fake: bool = False
    save_path: str = "./save"
    # sequential calibration writes each finished block (transformed weights + qparams) under
    # <save_path>/checkpoints/; a relaunch with the same settings resumes after the last finished block
    resume: bool = True


@dataclass
class DistConfig:
    actors: int = 1
    device: str = "cpu"
    address: Optional[str] = None  # an existing Ray cluster ("auto" or "ray://host:port"); None: start locally
    cpus_per_actor: int = 1
    # sequential: llmc's order, block i calibrates on block i-1's processed output (actors take turns);
    # parallel: one fp pass captures every block's inputs, then all actors calibrate at once
    schedule: str = "sequential"
    # parallel schedule: write each block's captured calibration inputs to files under this directory (one per
    # actor) instead of holding them in host RAM until the block is calibrated; None: host RAM
    spill_dir: Optional[str] = None
    # how eval batches and parallel-schedule captures go from actor to actor: collective (torch.distributed
    # sends, NCCL between GPUs: device to device), object_store (host copies through Ray), auto (object_store
    # until the sends are measured on GPUs: dist/cluster.py)
    transport: str = "auto"
    # MoE blocks, sequential schedule: each block's routed experts are calibrated on every actor (balanced by
    # their routed tokens), not only on the block's owner: the other actors would wait otherwise, and the
    # owner holds no expert's calibration state (GPTQ: one Hessian per expert). Same results as without.
    spread_experts: bool = False

    def __post_init__(self) -> None:
        _require(self.actors >= 1, f"dist.actors={self.actors}: need at least one actor")
        _require(self.transport in TRANSPORTS, f"dist.transport={self.transport!r}: use one of {TRANSPORTS}")
        _require(not self.spread_experts or self.schedule == "sequential",
                 "dist.spread_experts=true applies to the sequential schedule (under the parallel one every actor "
                 "already calibrates its own blocks at once): set dist.schedule=sequential or spread_experts=false")
        _require(self.schedule in SCHEDULES, f"dist.schedule={self.schedule!r}: use one of {SCHEDULES}")
        _require(self.device in ("cpu", "cuda"), f"dist.device={self.device!r}: use cpu or cuda")


@dataclass
class RunSection:
    task_name: str = "llmc_ray"
    target: str = "none"
    seed: int = 42
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.target in TARGETS, f"run.target={self.target!r}: use one of {TARGETS}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunSection = field(default_factory=RunSection)


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore so YAML typos fail at composition."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


def from_hydra(cfg: Any) -> RunConfig:
    """DictConfig -> RunConfig (runs every `__post_init__`), turning schema errors into ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if not isinstance(obj, RunConfig):  # composed without the schema (e.g. in tests from a plain dict)
        obj = build(OmegaConf.to_container(cfg, resolve=True))
    return obj


def build(d: Dict[str, Any]) -> RunConfig:
    """Plain nested dict -> RunConfig with the same checks (tests and scripts)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), d)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
