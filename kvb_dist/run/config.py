"""Experiment configuration: one dataclass per section, a YAML file, dotted overrides.

    config = load_config("configs/digits.yaml", ["train.lr=0.1", "run.name=try2"])

Unknown sections or keys, values of the wrong type, outside their choices or ranges, and
impossible combinations raise a ValueError at load time that names the key and lists what is
valid. World size is not configured here: it belongs to the launcher (torchrun / accelerate
launch), which passes it to `load_config(..., world_size=...)` for the checks that need it;
only the number of shards per replica is configured.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Dict, List, Optional, Sequence

import yaml


@dataclass
class RunSection:
    name: str = "digits"  # a relative path inside out_dir: "exp/a" is fine, "..", "/x" are not
    out_dir: str = "runs"  # the run folder is out_dir/name
    seed: int = 0  # 0 <= seed < 2**63
    checkpoint_every: int = 50  # training steps between checkpoints (and after every phase)
    async_checkpoints: bool = True  # mid-task checkpoints are written in the background
    tracker: str = "wandb"  # wandb | none
    wandb_mode: str = "auto"  # auto (online when logged in, else offline) | offline | online | disabled
    wandb_project: str = "kvb_dist"
    threads: int = 0  # torch threads per rank; 0: the node's idle CPUs shared by its ranks (launcher)


IMAGE_KEYS = ["jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff"]


@dataclass
class DataSection:
    dataset: str = "digits"  # digits | toy | cifar10 | webdataset | imagefolder
    root: str = "data"  # downloads (cifar10); imagefolder: root/<class>/<image> (or root/train, root/test)
    # webdataset: URL patterns of the splits (brace expansion, "::" between patterns, local paths, pipe:)
    train: str = ""
    test: str = ""
    init: str = ""  # optional: key fitting on other data than train
    image_keys: List[str] = field(default_factory=lambda: list(IMAGE_KEYS))  # the first one a sample has is its image
    feature_key: str = "npy"  # a sample with this field is a precomputed feature array instead
    label_key: str = "cls"
    # Tasks take classes in this order: [] = sorted labels, "random" = shuffled with run.seed, or a list of labels.
    class_order: Any = field(default_factory=list)
    test_fraction: float = 0.2  # digits / toy: held-out share per class
    image_size: int = 64  # images are resized to this before the encoder
    num_tasks: int = 5
    classes_per_task: int = 2
    init_dataset: str = "same"  # data for key initialization: same | cifar100 | uniform (toy)
    samples_per_shard: int = 512
    toy_samples_per_class: int = 500


@dataclass
class EncoderSection:
    # efficientnet_lite0 | dino_resnet50 | dino_vits8 | identity | torchvision/<model> | timm/<model>
    # | package.module:factory (an import path; the factory returns an nn.Module)
    name: str = "efficientnet_lite0"
    # import path, torchvision/, timm/: keyword arguments of the factory / get_model / create_model
    kwargs: Dict[str, Any] = field(default_factory=dict)
    extracted_layer: int = 3  # dino_resnet50: which residual stage
    pool_embedding: bool = True
    batch_size: int = 64


@dataclass
class BottleneckSection:
    num_codebooks: int = 64
    key_value_pairs_per_codebook: int = 512
    dim_keys: int = 32
    dim_values: int = 10
    splitting_mode: str = "random_projection"  # chunk | random_projection
    decay: float = 0.95
    eps: float = 1e-5
    threshold_ema_dead_code: float = 0.0
    topk: int = 1
    values_init: str = "zeros"  # zeros | normal


@dataclass
class InitSection:
    method: str = "kmeans"  # kmeans | ema | kmeans+ema
    kmeans_iters: int = 10
    ema_epochs: int = 1
    batch_size: int = 256  # global batch for EMA epochs


@dataclass
class TrainSection:
    settings: List[str] = field(default_factory=lambda: ["class_incremental", "iid"])
    learners: List[str] = field(default_factory=lambda: ["kvb", "linear_probe", "mlp"])
    batch_size: int = 64  # global batch; split evenly over ranks
    steps_per_task: int = 100  # class-incremental: steps on each task
    iid_steps: int = 300  # iid: steps on all classes at once
    optimizer: str = "adam"  # adam (lazy: torch.optim.SparseAdam) | sgd | adagrad, for the values
    lr: float = 0.01
    baseline_lr: float = 0.001  # linear probe and MLP (Adam)
    mlp_hidden: int = 256
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    mask_unused_pairs: bool = True  # evaluate with never-used pairs excluded, as the paper


@dataclass
class ParallelSection:
    num_shards: int = 0  # codebook shards per replica; 0 = every rank is a shard of one replica


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    bottleneck: BottleneckSection = field(default_factory=BottleneckSection)
    init: InitSection = field(default_factory=InitSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


CHOICES = {
    "run.tracker": ("wandb", "none"),
    "run.wandb_mode": ("auto", "offline", "online", "disabled"),
    "data.dataset": ("digits", "toy", "cifar10", "webdataset", "imagefolder"),
    "data.init_dataset": ("same", "cifar100", "uniform"),
    "bottleneck.splitting_mode": ("chunk", "random_projection"),
    "bottleneck.values_init": ("zeros", "normal"),
    "init.method": ("kmeans", "ema", "kmeans+ema"),
    "train.settings": ("class_incremental", "iid"),
    "train.learners": ("kvb", "linear_probe", "mlp"),
    "train.optimizer": ("adam", "sgd", "adagrad"),
}
POSITIVE = {
    "data.image_size", "data.num_tasks", "data.classes_per_task", "data.samples_per_shard",
    "data.toy_samples_per_class", "encoder.batch_size", "bottleneck.num_codebooks",
    "bottleneck.key_value_pairs_per_codebook", "bottleneck.dim_keys", "bottleneck.dim_values", "bottleneck.topk",
    "init.batch_size", "train.batch_size", "train.mlp_hidden", "run.checkpoint_every",
    "train.steps_per_task", "train.iid_steps",
}
NON_NEGATIVE = {
    "run.threads", "init.kmeans_iters", "init.ema_epochs", "bottleneck.threshold_ema_dead_code",
    "train.grad_clip", "parallel.num_shards",
}
POSITIVE_FLOAT = {"train.lr", "train.baseline_lr", "bottleneck.eps"}
# Seeds reach torch.manual_seed, numpy's default_rng (no negative seeds) and int64 counter hashes.
SEED_LIMIT = 2**63
# Classes per data set, for num_tasks x classes_per_task (toy: kvb_dist.toy.NUM_CLASSES).
DATASET_CLASSES = {"digits": 10, "cifar10": 10}


def _sections() -> Dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def _field_types(section_cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(path: str, value: Any, kind: Any, from_text: bool) -> Any:
    """Check (or, for command-line text, convert) a value against the field's type."""
    if kind is Any:  # data.class_order: "random" or a list of labels, checked by validate()
        if from_text and isinstance(value, str) and value.strip() != "random":
            try:
                return [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"{path} must be 'random' or comma-separated integer labels, got {value!r}") from None
        return value.strip() if isinstance(value, str) else value
    if typing.get_origin(kind) in (dict, Dict):  # encoder.kwargs: a mapping, or its YAML / JSON text
        if from_text and isinstance(value, str):
            value = _yaml_text(path, value)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(
                f"{path} must be a mapping with string keys, such as {{hidden: 3}} (or {path}.hidden=3 on the "
                f"command line), got {value!r}"
            )
        return dict(value)
    if typing.get_origin(kind) in (list, List):
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path} must be a list of strings, got {value!r}")
        return list(value)
    if from_text and isinstance(value, str):
        try:
            if kind is bool:
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return kind(value)
        except ValueError:
            raise ValueError(f"{path} must be of type {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _set(config: Config, path: str, value: Any, from_text: bool) -> None:
    sections = _sections()
    section_name, _, key = path.partition(".")
    if section_name not in sections:
        raise ValueError(f"unknown config section {section_name!r}; valid sections: {sorted(sections)}")
    types = _field_types(sections[section_name])
    key, _, entry = key.partition(".")  # encoder.kwargs.hidden=3: one entry of a mapping
    if key not in types or (entry and typing.get_origin(types[key]) not in (dict, Dict)):
        raise ValueError(f"unknown config key {path!r}; valid keys in [{section_name}]: {sorted(types)}")
    if entry:
        section = getattr(config, section_name)
        item = _yaml_text(path, value) if from_text and isinstance(value, str) else value
        setattr(section, key, {**getattr(section, key), entry: item})
        return
    setattr(getattr(config, section_name), key, _coerce(path, value, types[key], from_text))


def _yaml_text(path: str, text: str) -> Any:
    """A command-line value read as YAML (JSON is YAML): "3" -> 3, "[1, 2]" -> a list, "{a: 1}" -> a mapping."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}={text!r} is not a YAML / JSON value ({str(error).splitlines()[0]})") from None


def _get(config: Config, path: str) -> Any:
    section, key = path.split(".")
    return getattr(getattr(config, section), key)


def _dataset_classes(dataset: str) -> int:
    if dataset == "toy":  # imported here: kvb_dist.toy pulls in the model code
        from kvb_dist.toy import NUM_CLASSES

        return NUM_CLASSES
    return DATASET_CLASSES[dataset]


def _run_name_problem(name: str) -> Optional[str]:
    """Why out_dir/name would not be a folder strictly inside out_dir, or None."""
    parts = PurePath(name).parts
    if not parts:  # "" and "." are out_dir itself
        return "names run.out_dir itself"
    if PurePath(name).anchor:  # "/x" (or a drive): out_dir / name would drop out_dir
        return "is an absolute path"
    if ".." in parts:
        return "has a '..' part"
    return None


def _check_data_sources(data: DataSection) -> None:
    if data.dataset == "webdataset":
        missing = [key for key in ("train", "test") if not getattr(data, key).strip()]
        if missing:
            raise ValueError(
                f"data.dataset=webdataset needs data.{' and data.'.join(missing)}: WebDataset URL patterns such as "
                "'/data/train-{000000..000127}.tar' or 'pipe:curl -s https://host/train-{0000..0127}.tar'"
            )
    elif data.train or data.test or data.init:
        raise ValueError(f"data.train / data.test / data.init are URL patterns for data.dataset=webdataset, not {data.dataset!r}")
    if data.init and data.init_dataset != "same":
        raise ValueError(f"data.init={data.init!r} and data.init_dataset={data.init_dataset!r}: give one source of key-fitting data")
    if not data.image_keys or not data.label_key or not data.feature_key:
        raise ValueError("data.image_keys, data.feature_key and data.label_key must not be empty")
    order = data.class_order
    valid_order = order == "random" or (
        isinstance(order, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in order)
    )
    if not valid_order:
        raise ValueError(f"data.class_order must be 'random', [] (sorted labels) or a list of integer labels, got {order!r}")
    if isinstance(order, list):
        repeated = sorted({c for c in order if order.count(c) > 1})
        if repeated:
            raise ValueError(f"data.class_order lists {repeated} more than once")
        if order and len(order) < data.num_tasks * data.classes_per_task:
            raise ValueError(
                f"data.class_order has {len(order)} classes, fewer than data.num_tasks x data.classes_per_task = "
                f"{data.num_tasks * data.classes_per_task}"
            )


def _check_encoder(encoder: EncoderSection) -> None:
    """The name's syntax only: import paths and library models are resolved by the freeze phase."""
    from kvb_dist.encoders import encoder_source  # imported here: it pulls in the model code

    if not isinstance(encoder.name, str):
        raise ValueError(f"encoder.name must be a string, got {encoder.name!r}")
    if not isinstance(encoder.kwargs, dict) or not all(isinstance(k, str) for k in encoder.kwargs):
        raise ValueError(f"encoder.kwargs must be a mapping with string keys, got {encoder.kwargs!r}")
    if encoder_source(encoder.name) == "builtin" and encoder.kwargs:
        raise ValueError(
            f"encoder.kwargs={encoder.kwargs!r} applies to import-path, torchvision/ and timm/ encoders only; "
            f"encoder.name={encoder.name!r} takes none (use its own keys: extracted_layer, pool_embedding)"
        )


def _check_world_size(config: Config, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    batch = config.train.batch_size
    if batch % world_size:
        lower = batch - batch % world_size
        nearest = [n for n in (lower, lower + world_size) if n >= 1]
        raise ValueError(
            f"train.batch_size={batch} must be divisible by the world size {world_size} (it is split evenly "
            f"over ranks); valid batch sizes are multiples of {world_size}, e.g. {' or '.join(map(str, nearest))}"
        )
    # EMA key fitting takes init.batch_size // world_size samples per rank (at least 1): a smaller
    # global batch than ranks would silently become a batch of world_size.
    if "ema" in config.init.method and config.init.batch_size < world_size:
        raise ValueError(
            f"init.batch_size={config.init.batch_size} must be >= the world size {world_size} for "
            f"init.method={config.init.method!r}; valid: any init.batch_size >= {world_size}"
        )


def validate(config: Config, world_size: Optional[int] = None) -> Config:
    """Choices, ranges and cross-field rules; raises ValueError naming the key.

    world_size (from the launcher), when given, adds the checks that depend on it.
    """
    for path, choices in CHOICES.items():
        value = _get(config, path)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                raise ValueError(f"{path}={item!r} is not valid; choose from {list(choices)}")
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise ValueError(f"{path} lists {repeated} more than once; list each of {list(choices)} at most once")
    # No float setting has a meaning at NaN or infinity (an infinite lr trains every learner to chance).
    for section_name, section_cls in _sections().items():
        for key, kind in _field_types(section_cls).items():
            value = getattr(getattr(config, section_name), key)
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{section_name}.{key} must be a finite number, got {value}")
    for path in sorted(POSITIVE):
        if _get(config, path) < 1:
            raise ValueError(f"{path} must be >= 1, got {_get(config, path)}")
    for path in sorted(POSITIVE_FLOAT):
        if not _get(config, path) > 0:
            raise ValueError(f"{path} must be > 0, got {_get(config, path)}")
    for path in sorted(NON_NEGATIVE):
        if _get(config, path) < 0:
            raise ValueError(f"{path} must be >= 0, got {_get(config, path)}")
    _check_encoder(config.encoder)
    b = config.bottleneck
    if b.topk > b.key_value_pairs_per_codebook:
        raise ValueError(f"bottleneck.topk={b.topk} exceeds bottleneck.key_value_pairs_per_codebook")
    if not 0.0 <= b.decay <= 1.0:
        raise ValueError(f"bottleneck.decay must be in [0, 1], got {b.decay}")
    if not 0.0 < config.data.test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {config.data.test_fraction}")
    if not 0.0 <= config.train.label_smoothing < 1.0:
        raise ValueError(f"train.label_smoothing must be in [0, 1), got {config.train.label_smoothing}")
    if not 0 <= config.run.seed < SEED_LIMIT:
        raise ValueError(
            f"run.seed must be in [0, 2**63) (it seeds torch, numpy's default_rng and int64 counter hashes), "
            f"got {config.run.seed}"
        )
    problem = _run_name_problem(config.run.name)
    if problem:
        raise ValueError(
            f"run.name={config.run.name!r} {problem}; it must be a relative path that stays inside "
            f"run.out_dir, such as 'digits' or 'exp/a' (no '..' parts)"
        )
    if not config.train.settings or not config.train.learners:
        raise ValueError("train.settings and train.learners must not be empty")
    data = config.data
    _check_data_sources(data)
    # Users' data sets: their classes are known once the freeze phase has read them (train checks).
    available = _dataset_classes(data.dataset) if data.dataset in DATASET_CLASSES or data.dataset == "toy" else None
    if available is not None and data.num_tasks * data.classes_per_task > available:
        raise ValueError(
            f"data.num_tasks x data.classes_per_task = {data.num_tasks} x {data.classes_per_task} = "
            f"{data.num_tasks * data.classes_per_task} exceeds the {available} classes of "
            f"data.dataset={data.dataset!r}; valid: num_tasks x classes_per_task <= {available}"
        )
    if world_size is not None:
        _check_world_size(config, world_size)
    return config


def load_config(
    path: Optional[str | Path] = None, overrides: Sequence[str] = (), world_size: Optional[int] = None
) -> Config:
    """Defaults, then the YAML file's sections, then `section.key=value` overrides, validated.

    world_size: the launcher's number of processes; when given, train.batch_size (and, for EMA
    key fitting, init.batch_size) are checked against it too.
    """
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:  # one line for the launcher, not a parser traceback
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping of keys to values")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value, from_text=False)
    for override in overrides:
        dotted, sep, value = override.partition("=")
        if not sep or "." not in dotted:
            raise ValueError(f"override {override!r} must look like section.key=value")
        _set(config, dotted.strip(), value.strip(), from_text=True)
    return validate(config, world_size)
