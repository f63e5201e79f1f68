"""Training configuration: one frozen dataclass, named presets, typed overrides."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from typing import Dict, Tuple

from .data.sources import CIFAR10_DOWNLOAD
from .kernels._common import DEFAULT_PRECISION, PRECISIONS  # torch only: no Triton needed

DEFAULT_PRESET = "demo"


@dataclass(frozen=True)
class Config:
    """Every knob of a run. Defaults are the official SwAV ResNet-50 100-epoch recipe."""

    # data
    data: str = field(default="", metadata={"help": "training data: image folder, zip of JPEGs, FFCV .beton (decode-once GPU multi-crop; see python -m fastswav.data.write), a download root for torchvision-cifar10, or download:cifar10 (torchvision's CIFAR-10 in ~/.cache/fastswav/data, fetched on first use)"})
    data_kind: str = field(default="auto", metadata={"help": "auto | folder | zip | beton | torchvision-cifar10"})
    workers: int = field(default=-1, metadata={"help": "data loader workers per training process (decode threads for a .beton, worker processes otherwise); -1: the cores this process may use shared among the processes of this machine (torchrun's LOCAL_WORLD_SIZE)"})
    in_memory: bool = field(default=False, metadata={"help": "pil augmentation: decode the whole dataset into memory once (small data only)"})
    augment: str = field(default="pil", metadata={"help": "pil: torchvision transforms per image in loader workers; batched: decode every image once into device memory and cut all crops as batched tensor work (small data, e.g. CIFAR-10). A .beton always takes the decode-once loader (batched crops on the device)"})
    # multi-crop
    n_crops: Tuple[int, ...] = field(default=(2, 6), metadata={"help": "crops per resolution group"})
    size_crops: Tuple[int, ...] = field(default=(224, 96), metadata={"help": "crop size per group"})
    min_scale_crops: Tuple[float, ...] = field(default=(0.14, 0.05), metadata={"help": "RandomResizedCrop min area fraction per group"})
    max_scale_crops: Tuple[float, ...] = field(default=(1.0, 0.14), metadata={"help": "RandomResizedCrop max area fraction per group"})
    blur_prob: float = field(default=0.5, metadata={"help": "Gaussian blur probability"})
    jitter_strength: float = field(default=1.0, metadata={"help": "colour jitter strength s (0.8s, 0.8s, 0.8s, 0.2s)"})
    # model
    arch: str = field(default="resnet50", metadata={"help": "trunk: resnet18/34/50/101/152, resnet50w2/w4/w5 (built in), torchvision/<name> (any torchvision classification model) or timm/<name> (any timm model; pip install 'fastswav[timm]'), optionally with constructor keywords: timm/vit_tiny_patch16_224:patch_size=8"})
    trunk_width: int = field(default=0, metadata={"help": "built-in ResNets: channels of the stem and first stage (0: the arch's own)"})
    small_images: bool = field(default=False, metadata={"help": "built-in ResNets: 3x3 stride-1 stem without max-pool (32x32 data)"})
    zero_init_residual: bool = field(default=False, metadata={"help": "built-in ResNets: start the last BatchNorm of each residual block at zero (every block begins as the identity)"})
    hidden_dim: int = field(default=2048, metadata={"help": "projection head hidden width (0: linear head)"})
    out_dim: int = field(default=128, metadata={"help": "embedding dimension"})
    n_prototypes: int = field(default=3000, metadata={"help": "number of prototypes K"})
    checkpoint_activations: bool = field(default=False, metadata={"help": "recompute the trunk's block activations in backward instead of keeping them (less memory, about a third more trunk compute)"})
    channels_last: bool = field(default=True, metadata={"help": "NHWC memory format for the trunk on CUDA (ignored on the CPU, where torch 2.14's oneDNN NHWC convolutions gave run-to-run differences)"})
    sync_bn: bool = field(default=True, metadata={"help": "SyncBatchNorm across CUDA processes"})
    sync_bn_group_size: int = field(default=0, metadata={"help": "processes per SyncBatchNorm group (0: all; must divide the process count)"})
    # loss
    crops_for_assign: Tuple[int, ...] = field(default=(0, 1), metadata={"help": "crops whose codes are predicted"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature"})
    epsilon: float = field(default=0.05, metadata={"help": "Sinkhorn regularisation"})
    sinkhorn_iterations: int = field(default=3, metadata={"help": "Sinkhorn rounds"})
    loss_precision: str = field(default=DEFAULT_PRECISION, metadata={"help": "matmul precision of the fused loss: tf32 (default; as accurate as the official fp16 run or better), tf32x3 (near fp32), bf16, or ieee (fp32 throughout, the exact mode for checks); the reference loss is always exact"})
    queue_length: int = field(default=0, metadata={"help": "feature queue length over all processes (0: no queue)"})
    epoch_queue_starts: int = field(default=15, metadata={"help": "epoch at which the queue starts filling"})
    # optimisation
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "cap on steps per epoch (0: the whole dataset)"})
    batch_size: int = field(default=64, metadata={"help": "images per process per forward pass (micro-batch); Sinkhorn balances the codes over batch_size x processes images"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches whose gradients add up to one optimizer step: the optimizer's global batch is batch_size x processes x grad_accum (the learning-rate scaling and schedule use it), Sinkhorn and BatchNorm see one micro-batch"})
    base_lr: float = field(default=4.8, metadata={"help": "peak learning rate"})
    final_lr: float = field(default=0.0048, metadata={"help": "learning rate at the end of the cosine"})
    lr_reference_batch: int = field(default=0, metadata={"help": "global batch base_lr is set for; lr scales linearly with the real one (0: no scaling)"})
    warmup_epochs: int = field(default=10, metadata={"help": "linear warm-up epochs"})
    start_warmup: float = field(default=0.3, metadata={"help": "learning rate at the start of the warm-up"})
    weight_decay: float = field(default=1e-6, metadata={"help": "weight decay"})
    optimizer: str = field(default="lars", metadata={"help": "lars (official: SGD wrapped in LARC) or sgd (plain SGD with momentum)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    trust_coefficient: float = field(default=0.001, metadata={"help": "LARS trust coefficient"})
    lars_exclude_bn_bias: bool = field(default=False, metadata={"help": "no LARS adaptation or decay for BN and bias parameters"})
    freeze_prototypes_niters: int = field(default=313, metadata={"help": "iterations during which the prototypes are not updated"})
    # speed and scale-out
    compile: str = field(default="none", metadata={"help": "torch.compile the forward and loss: none | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs"})
    ddp_bucket_mb: int = field(default=25, metadata={"help": "DDP gradient bucket size in MB"})
    dist_timeout_s: float = field(default=300.0, metadata={"help": "seconds a collective may wait for the other processes before the run stops with exit status 69 (a process died or stopped responding); long enough for the first compilation and a checkpoint write"})
    # run
    seed: int = field(default=31, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    output_dir: str = field(default="", metadata={"help": "run folder (default runs/<preset>)"})
    init_from: str = field(default="", metadata={"help": "start a new run from pretrained weights: a fastswav checkpoint, an official SwAV checkpoint (swav_800ep_pretrain.pth.tar) or a torchvision ResNet state dict; the trunk must fit, the head and prototypes are taken where shaped alike. Not a resume: the run keeps its own schedule from epoch 0 (ignored when the run folder holds a checkpoint to resume)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "epoch checkpoints kept in the run folder (0: all)"})
    log_every: int = field(default=20, metadata={"help": "steps between log records (and the only host syncs of the step loop)"})
    tensorboard: bool = field(default=True, metadata={"help": "also write TensorBoard scalars to RUN/tensorboard when the tensorboard package is installed"})
    nvtx: bool = field(default=False, metadata={"help": "NVTX ranges around the step phases (on by itself inside a profile window)"})
    profile: str = field(default="", metadata={"help": "START:STOP iterations between cudaProfilerStart and cudaProfilerStop, for nsys --capture-range=cudaProfilerApi or ncu --profile-from-start off"})
    knn_at_end: bool = field(default=False, metadata={"help": "kNN accuracy at initialisation and after training"})
    knn_k: int = field(default=20, metadata={"help": "kNN neighbours"})
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN weighting temperature"})
    knn_max_train: int = field(default=0, metadata={"help": "kNN memory images (0: all)"})
    knn_max_test: int = field(default=0, metadata={"help": "kNN query images (0: all)"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        groups = len(self.n_crops)
        if groups == 0 or any(n < 1 for n in self.n_crops):
            raise ValueError(f"n_crops must be positive counts, got {self.n_crops}")
        for name in ("size_crops", "min_scale_crops", "max_scale_crops"):
            if len(getattr(self, name)) != groups:
                raise ValueError(f"{name} needs {groups} values (one per crop group), got {getattr(self, name)}")
        if sum(self.n_crops) < 2:
            raise ValueError("SwAV needs at least 2 crops in all")
        for c in self.crops_for_assign:
            if not 0 <= c < sum(self.n_crops):
                raise ValueError(f"crops_for_assign entry {c} is not a crop index (0..{sum(self.n_crops) - 1})")
        positive = ("batch_size", "grad_accum", "epochs", "n_prototypes", "out_dim", "log_every", "knn_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must lie in 0..epochs={self.epochs}")
        if self.temperature <= 0 or self.epsilon <= 0:
            raise ValueError("temperature and epsilon must be > 0")
        if self.data_kind not in ("auto", "folder", "zip", "torchvision-cifar10", "beton"):
            raise ValueError(f"data_kind={self.data_kind!r}: expected auto, folder, zip, beton or torchvision-cifar10")
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected lars or sgd")
        if self.workers < -1:
            raise ValueError(f"workers must be >= 0, or -1 for the cores per process, got {self.workers}")
        if self.augment not in ("pil", "batched"):
            raise ValueError(f"augment={self.augment!r}: expected pil or batched")
        from .profiling import parse_window
        from .step import check_compile_mode

        if self.loss_precision not in PRECISIONS:
            raise ValueError(f"loss_precision={self.loss_precision!r}: expected one of {', '.join(PRECISIONS)}")
        check_compile_mode(self.compile, self.grad_accum)
        parse_window(self.profile)
        if self.sync_bn_group_size < 0 or self.ddp_bucket_mb < 1:
            raise ValueError("sync_bn_group_size must be >= 0 and ddp_bucket_mb >= 1")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")

    @property
    def total_crops(self) -> int:
        return sum(self.n_crops)

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * world_size * self.grad_accum

    def to_dict(self) -> Dict[str, typing.Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Dict[str, typing.Any]) -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_IMAGENET_4096 = dict(batch_size=64, base_lr=4.8, final_lr=0.0048, freeze_prototypes_niters=313,
                      warmup_epochs=10, start_warmup=0.3, queue_length=0)
_IMAGENET_256 = dict(batch_size=64, base_lr=0.6, final_lr=0.0006, freeze_prototypes_niters=5005,
                     warmup_epochs=0, start_warmup=0.0, queue_length=3840, epoch_queue_starts=15)

# name -> (one-line description, overrides of the Config defaults)
PRESETS: Dict[str, Tuple[str, Dict[str, typing.Any]]] = {
    "demo": (
        "CIFAR-10 on a CPU in minutes: small ResNet-18, 2x32 + 4x16 crops, K=100, SGD, kNN before/after",
        dict(data=CIFAR10_DOWNLOAD, augment="batched", workers=0,
             n_crops=(2, 4), size_crops=(32, 16), min_scale_crops=(0.2, 0.08),
             max_scale_crops=(1.0, 0.3), blur_prob=0.0, jitter_strength=0.5,
             arch="resnet18", trunk_width=16, small_images=True, zero_init_residual=True,
             hidden_dim=512, out_dim=64, n_prototypes=100, sync_bn=False,
             # Sharper codes than the official 0.05: with 64 images per Sinkhorn, eps 0.05
             # leaves the codes near uniform (seed 31, trained kNN 32.60 % at 0.05 and 34.35 %
             # at 0.02; with zero-init residual blocks 33.65 % and 35.45 %; docs/demo.md).
             epsilon=0.02, epochs=6, steps_per_epoch=100, batch_size=64,
             # Plain SGD: LARS (trust ratio 0.001) learned less at batch 64 in 600 iterations
             # (seed 31, trained kNN 30.40 % with LARS, 35.45 % with SGD; docs/demo.md).
             optimizer="sgd", base_lr=0.3, final_lr=0.003, weight_decay=1e-5,
             warmup_epochs=1, start_warmup=0.03, freeze_prototypes_niters=60, log_every=20,
             knn_at_end=True, knn_max_train=10000, knn_max_test=2000),
    ),
    "100ep": ("official RN50, 100 epochs, global batch 4096 (64 x 64)", dict(_IMAGENET_4096, epochs=100)),
    "200ep": ("official RN50, 200 epochs, global batch 4096 (64 x 64)", dict(_IMAGENET_4096, epochs=200)),
    "400ep": ("official RN50, 400 epochs, global batch 4096 (64 x 64)", dict(_IMAGENET_4096, epochs=400)),
    "800ep": ("official RN50, 800 epochs, global batch 4096 (64 x 64)", dict(_IMAGENET_4096, epochs=800)),
    "200ep_bs256": ("official RN50, 200 epochs, global batch 256 (4 x 64), queue 3840 from epoch 15",
                    dict(_IMAGENET_256, epochs=200)),
    "400ep_bs256": ("official RN50, 400 epochs, global batch 256 (4 x 64), queue 3840 from epoch 15",
                    dict(_IMAGENET_256, epochs=400)),
    "400ep_2x224": ("official RN50, 400 epochs, 2x224 crops only (scale 0.08-1), global batch 4096",
                    dict(_IMAGENET_4096, epochs=400, n_crops=(2,), size_crops=(224,),
                         min_scale_crops=(0.08,), max_scale_crops=(1.0,))),
    "100ep_fast": (
        "the official 100-epoch recipe (global batch 4096) on 8 GPUs: 256 images per GPU x 2 "
        "accumulated micro-batches, plain BatchNorm per GPU, compiled; lr scales with the global batch",
        # 512 images per GPU do not fit an 80 GB card (python -m fastswav.info --memory);
        # 256 x 2 keeps the optimizer's batch and schedule. Plain BatchNorm: SyncBatchNorm
        # breaks the compiled graph, and 256 images (x 8 crops) per GPU give the statistics
        # the official run got from synchronising 64-image GPUs (docs/memory.md).
        # compile "default": the mode bench_train.py is to confirm on a GPU.
        dict(_IMAGENET_4096, epochs=100, batch_size=256, grad_accum=2, lr_reference_batch=4096,
             sync_bn=False, compile="default")),
    "cifar10_speedrun": (
        "CIFAR-10 on one GPU in minutes: ResNet-18 (small-image stem), data resident on the GPU, 2x32 + 4x16 crops",
        # The demo's crops and optimiser scaled to a full-width ResNet-18 and a GPU-sized
        # batch. Keeps the official epsilon 0.05 and torchvision's initialisation: the demo's
        # sharper epsilon was measured with 64 images per Sinkhorn, this has 512. Not yet
        # tuned on a GPU (docs/demo.md).
        dict(data=CIFAR10_DOWNLOAD, augment="batched", workers=0,
             n_crops=(2, 4), size_crops=(32, 16), min_scale_crops=(0.2, 0.08),
             max_scale_crops=(1.0, 0.3), blur_prob=0.0, jitter_strength=0.5,
             arch="resnet18", trunk_width=0, small_images=True, hidden_dim=2048, out_dim=128,
             n_prototypes=300, sync_bn=False, epochs=30, batch_size=512,
             optimizer="sgd", base_lr=0.6, final_lr=0.0006, weight_decay=1e-5,
             warmup_epochs=2, start_warmup=0.06, freeze_prototypes_niters=200, log_every=20,
             compile="default", knn_at_end=True, knn_max_train=0, knn_max_test=0),
    ),
}


# Fields a resumed run may change: where the data is read from and how fast, what is logged
# and profiled, how the work is spread (the global batch is checked separately), evaluation.
# Every other field changes shapes (model, crops, prototypes, queue) or the meaning of the
# schedule and the loss (batch, epochs, learning rates, optimiser, seed), so a checkpoint
# trained with another value cannot be continued as the same run.
RESUME_MAY_CHANGE = frozenset({
    "data", "data_kind", "workers", "in_memory", "augment", "channels_last", "sync_bn",
    "sync_bn_group_size", "compile", "ddp_bucket_mb", "device", "output_dir",
    "keep_checkpoints", "log_every", "tensorboard", "nvtx", "profile", "knn_at_end", "knn_k",
    "knn_temperature", "knn_max_train", "knn_max_test", "loss_precision", "dist_timeout_s",
    "checkpoint_activations", "init_from",
})


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resume_differences(saved: Dict[str, typing.Any], cfg: Config, saved_world_size: int = 0,
                       world_size: int = 1):
    """How ``cfg`` (run on ``world_size`` processes) differs from the ``saved`` config of a run
    folder (trained on ``saved_world_size`` processes; 0: unknown).

    Returns ``(blocking, allowed)``, each a list of ``"field old -> new"`` texts: blocking
    fields change shapes or the schedule (see :data:`RESUME_MAY_CHANGE`), allowed ones may
    change on resume. The per-process batch may change with the process count as long as
    the global batch stays the same. Fields unknown to either side are ignored.
    """
    blocking, allowed = [], []
    now = cfg.to_dict()
    for name in sorted(set(saved) & set(now)):
        old, new = saved[name], now[name]
        if isinstance(old, list) and isinstance(new, list):
            same = len(old) == len(new) and all(a == b for a, b in zip(old, new))
        else:
            same = old == new
        if name == "grad_accum" and saved_world_size and "batch_size" in saved:
            continue  # judged with batch_size: the global batch is what must stay
        if name == "batch_size" and saved_world_size:
            old_accum, new_accum = saved.get("grad_accum", 1), now["grad_accum"]
            old_global = old * saved_world_size * old_accum
            new_global = new * world_size * new_accum
            if old_global != new_global:
                blocking.append(f"global batch {old} x {saved_world_size} x {old_accum} = "
                                f"{old_global} -> {new} x {world_size} x {new_accum} = {new_global}")
            elif saved_world_size != world_size or old != new:
                allowed.append(f"processes {saved_world_size} -> {world_size} "
                               f"(batch per process {old} -> {new}, accumulation {old_accum} -> "
                               f"{new_accum}, global {new_global})")
            continue
        if same:
            continue
        text = f"{name} {_shown(old)} -> {_shown(new)}"
        (allowed if name in RESUME_MAY_CHANGE else blocking).append(text)
    return blocking, allowed


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Config(**PRESETS[name][1])


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_value(name: str, text: str):
    """``text`` converted to the type of config field ``name`` (tuples: comma-separated)."""
    known = {f.name: f for f in fields(Config)}
    if name not in known:
        raise ValueError(f"unknown config field {name!r} (see --help for the list)")
    hint = typing.get_type_hints(Config)[name]
    try:
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            parts = [p for p in text.replace(" ", ",").split(",") if p]
            return tuple(item(p) for p in parts)
        if hint is bool:
            return _bool(text)
        return hint(text)
    except ValueError:
        if typing.get_origin(hint) is tuple:
            type_name = f"list of {typing.get_args(hint)[0].__name__}"
        else:
            type_name = hint.__name__
        raise ValueError(f"--{name}={text!r}: expected {type_name}") from None


def field_help(defaults: typing.Optional[Config] = None) -> str:
    """One line per field for --help: name, type, default, description. ``defaults``: the
    config whose values are shown as the defaults (a preset's; the dataclass's when None)."""
    hints = typing.get_type_hints(Config)
    lines = []
    for f in fields(Config):
        hint = hints[f.name]
        type_name = "list" if typing.get_origin(hint) is tuple else hint.__name__
        default = f.default if defaults is None else getattr(defaults, f.name)
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        lines.append(f"  --{f.name}=<{type_name}>  {f.metadata.get('help', '')} [default {default!r}]")
    return "\n".join(lines)
