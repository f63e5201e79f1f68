"""Per-process peak memory of a training recipe, known before the first step.

The tensors a step keeps for its backward are measured on the model itself: its forward
runs on fake tensors (``FakeTensorMode``: shapes and dtypes, no memory, no device needed)
at two small batches under saved-tensor hooks, and the bytes grow linearly with the batch
from there. On CUDA the step runs under bf16 autocast, so the fake model computes in bf16
there (same saved dtypes: bf16 activations, float32 statistics); on the CPU in float32.
With activation checkpointing only the inputs of the checkpointed blocks stay, plus one
block's activations while it is recomputed.

The rest is counted: float32 parameters, gradients (DDP uses them as its buckets) and the
optimizer's momentum; autocast's bf16 weight copies; the crops of the step's micro-batches
and of the batch being loaded (bf16 on CUDA, float32 elsewhere); the loss's score matrices;
the feature queue; with a .beton, the decode-once data path on the device: two batches of
uint8 canvases (the one augmented, the next copied in) and the augmentation's working set
(:func:`augment_peak_bytes`), with the loader's pinned host buffers reported beside. A margin
covers what is neither: the backward's transient tensors (10 % of the activations) and, on
a GPU, the CUDA context, cuDNN/cuBLAS workspaces and the caching allocator's slack
(1.5 GiB). With checkpointing the estimate is an upper bound: it keeps every block input
and the largest block's activations at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("fastswav")

GiB = 2 ** 30
# The backward's transient tensors (the gradient of the activation being processed, the
# temporaries of each op's backward), as a share of the saved activations.
TRANSIENT_FRACTION = 0.10
# CUDA context, cuDNN/cuBLAS workspaces and the caching allocator's slack, on a GPU.
GPU_RESERVED_BYTES = int(1.5 * GiB)
# An "80 GB" card (H100 80GB, A100 80GB): 80e9 bytes, 74.5 GiB.
CARD_80GB_BYTES = 80 * 10 ** 9
# Presets must leave this share of an 80 GB card free by the estimate.
PRESET_HEADROOM = 0.15
_PROBE_BATCHES = (2, 4)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process holds at its peak, by part."""

    device_type: str
    batch: int                  # images per micro-batch
    activations_per_image: int  # saved for backward, per multi-crop image
    activations: int
    parameters: int
    gradients: int
    optimizer_state: int
    weight_copies: int          # autocast's bf16 copies of the weights (CUDA)
    inputs: int                 # crops of the step's micro-batches + the one being loaded
    loss: int                   # score matrices of the loss, forward and backward
    queue: int
    transients: int
    reserved: int               # CUDA context, workspaces, allocator slack (GPU only)
    data_path: int = 0          # decode-once: canvases on the device + the augmentation's peak
    host_pinned: int = 0        # decode-once: the loader's pinned host buffers (not device memory)

    @property
    def total(self) -> int:
        return (self.activations + self.parameters + self.gradients + self.optimizer_state
                + self.weight_copies + self.inputs + self.loss + self.queue + self.transients
                + self.reserved + self.data_path)

    def rows(self) -> List[Tuple[str, int]]:
        return [
            ("activations saved for backward", self.activations),
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("bf16 weight copies (autocast)", self.weight_copies),
            ("input crops", self.inputs),
            ("loss scores", self.loss),
            ("feature queue", self.queue),
            ("backward transients", self.transients),
            ("CUDA context, workspaces, allocator slack", self.reserved),
            ("decode-once canvases and augmentation", self.data_path),
        ]

    def fits(self, capacity: int, headroom: float = 0.0) -> bool:
        return self.total <= capacity * (1.0 - headroom)


def _storage_key(t: torch.Tensor) -> int:
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage()).cdata


def _measure_saved(model: nn.Module, crops: List[torch.Tensor], units: List[nn.Module],
                   checkpointed: bool) -> Tuple[int, int]:
    """Bytes of the distinct storages the forward of ``crops`` saves for backward, leaving
    out the parameters, and 0; with ``checkpointed``, what stays when each unit keeps only
    its inputs plus the largest unit's own activations (alive while it is recomputed), and
    those largest activations alone."""
    params = {_storage_key(p) for p in model.parameters()}
    outside, inputs, per_unit = {}, {}, []
    active: List[int] = []

    def pack(t):
        key = _storage_key(t)
        if key not in params:
            target = per_unit[active[0]] if active else outside
            target[key] = t.untyped_storage().nbytes()
        return t

    def pre(index):
        def hook(module, args):
            if not active:
                for a in args:
                    if isinstance(a, torch.Tensor):
                        inputs[_storage_key(a)] = a.untyped_storage().nbytes()
            active.append(index)
        return hook

    def post(module, args, output):
        active.pop()

    handles = []
    for i, unit in enumerate(units):
        per_unit.append({})
        handles.append(unit.register_forward_pre_hook(pre(i)))
        handles.append(unit.register_forward_hook(post))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(crops)
    finally:
        for h in handles:
            h.remove()
    if not checkpointed:
        everything = dict(outside)
        for unit_saved in per_unit:
            everything.update(unit_saved)
        return sum(everything.values()), 0
    kept = dict(outside)
    kept.update(inputs)
    largest = max((sum(u.values()) for u in per_unit), default=0)
    return sum(kept.values()) + largest, largest


def _linear(batches, values) -> Tuple[int, int]:
    (b1, m1), (b2, m2) = zip(batches, values)
    per_image = (m2 - m1) / (b2 - b1)
    return max(int(m1 - b1 * per_image), 0), int(round(per_image))


def _measure_at_probe_batches(cfg, dtype) -> List[Tuple[int, int]]:
    """:func:`_measure_saved` of ``cfg``'s model (built in ``dtype``, plain forward) at each
    probe batch, on whatever device and tensor mode are current."""
    from .model import build_model, checkpoint_units

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(cfg.replace(checkpoint_activations=False))
    finally:
        torch.set_default_dtype(previous)
    model.train()
    units = checkpoint_units(model.trunk)
    measured = []
    for batch in _PROBE_BATCHES:
        crops = [torch.randn(batch, 3, size, size, dtype=dtype)
                 for n, size in zip(cfg.n_crops, cfg.size_crops) for _ in range(n)]
        measured.append(_measure_saved(model, crops, units, cfg.checkpoint_activations))
    return measured


def activation_bytes(cfg, device_type: str = "cuda") -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((bytes at batch 0, bytes per image), (the same for one recomputed block))``: what
    the step saves for backward, and with activation checkpointing the activations of the
    largest block (0 without), measured on the model of ``cfg`` on fake tensors at two
    small batches (no memory, any machine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    try:
        with FakeTensorMode(), torch.device(device_type):
            measured = _measure_at_probe_batches(cfg, dtype)
    except Exception as exc:  # noqa: BLE001 (a model that reads a value while it runs)
        log.info("memory estimate: %s cannot run on fake tensors (%s); measuring on the CPU "
                 "at %s images", cfg.arch, type(exc).__name__, " and ".join(map(str, _PROBE_BATCHES)))
        measured = _measure_at_probe_batches(cfg, dtype)
    return (_linear(_PROBE_BATCHES, [kept for kept, _ in measured]),
            _linear(_PROBE_BATCHES, [largest for _, largest in measured]))


# Canvases a decode-once loader has on the device at once: the batch being augmented and
# the next one being copied in.
CANVASES_ON_DEVICE = 2
# Float32 crop-group-sized tensors alive at once in the augmentation's colour and blur steps
# (the crops, the blurred planes with their padding, the two convolution outputs).
AUGMENT_FLOAT_COPIES = 4


def augment_peak_bytes(batch: int, canvas: int, size_crops, n_crops, device_type: str) -> int:
    """Peak bytes of one :class:`~fastswav.data.batched_multicrop.BatchedMultiCrop` call on
    ``batch`` canvases of side ``canvas`` beyond its input and its output crops: the canvases
    in the resize dtype (float16 on CUDA, float32 elsewhere), plus the largest crop group's
    working set: the two resize matmuls' results, or the float32 copies of the colour and
    blur steps, whichever is larger."""
    resize = 2 if device_type == "cuda" else 4
    pixels = batch * 3 * canvas * canvas * resize
    group = 0
    for size, count in zip(size_crops, n_crops):
        n = batch * count
        matmuls = batch * count * size * 3 * canvas * resize + n * 3 * size * size * resize
        floats = AUGMENT_FLOAT_COPIES * n * 3 * size * size * 4
        group = max(group, matmuls, floats)
    return pixels + group


def decode_once_canvas(cfg) -> Optional[int]:
    """The canvas side the decode-once loader will use for ``cfg``'s data (the .beton's
    largest stored side, at most 1024), the writer's default cap where the file cannot be
    read yet; None where the data is not a .beton."""
    from .data.decode_once import MAX_DEFAULT_CANVAS
    from .data.write import DEFAULT_MAX_RESOLUTION

    data = getattr(cfg, "data", "") or ""
    if not (cfg.data_kind == "beton" or (cfg.data_kind == "auto" and data.endswith(".beton"))):
        return None
    try:
        from .data.beton import IMAGE, BetonFile

        stored = BetonFile(data).metadata[IMAGE]
        return min(int(max(stored["height"].max(), stored["width"].max())), MAX_DEFAULT_CANVAS)
    except (OSError, ValueError):
        return DEFAULT_MAX_RESOLUTION


def estimate(cfg, world_size: int = 1, device_type: str = "cuda") -> MemoryEstimate:
    """Peak bytes of one of ``world_size`` training processes of ``cfg`` on ``device_type``."""
    from .model import build_model

    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(cfg.replace(checkpoint_activations=False)).parameters())
    (fixed, per_image), _ = activation_bytes(cfg, device_type)
    batch = cfg.batch_size
    activations = fixed + per_image * batch
    pixels = sum(n * 3 * size * size for n, size in zip(cfg.n_crops, cfg.size_crops))
    n_assign = len(cfg.crops_for_assign)
    global_micro = cfg.batch_size * world_size
    queue_rows = (cfg.queue_length - cfg.queue_length % global_micro) // world_size
    gpu = device_type == "cuda"
    from .data.batched_multicrop import training_crop_dtype

    crop_bytes = torch.finfo(training_crop_dtype(device_type)).bits // 8
    canvas = decode_once_canvas(cfg)
    data_path = host_pinned = 0
    if canvas is not None:
        canvas_bytes = batch * 3 * canvas * canvas
        data_path = (CANVASES_ON_DEVICE * canvas_bytes
                     + augment_peak_bytes(batch, canvas, cfg.size_crops, cfg.n_crops, device_type))
        if gpu:  # FFCV's batches_ahead + 2 slots (the default 2 ahead), as many as needed
            host_pinned = 4 * canvas_bytes
    return MemoryEstimate(
        device_type=device_type,
        batch=batch,
        activations_per_image=per_image,
        activations=activations,
        parameters=4 * n_params,
        gradients=4 * n_params,
        optimizer_state=4 * n_params if cfg.momentum else 0,
        weight_copies=2 * n_params if gpu else 0,
        inputs=crop_bytes * pixels * batch * (cfg.grad_accum + 1),
        loss=4 * cfg.n_prototypes * (2 * cfg.total_crops * batch + n_assign * (queue_rows + batch)),
        queue=4 * n_assign * queue_rows * cfg.out_dim,
        transients=int(TRANSIENT_FRACTION * activations),
        reserved=GPU_RESERVED_BYTES if gpu else 0,
        data_path=data_path,
        host_pinned=host_pinned,
    )


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def format_estimate(est: MemoryEstimate, cfg, label: str,
                    capacities: Optional[List[Tuple[str, int]]] = None) -> str:
    """The estimate by part, then a verdict against each ``(name, bytes)`` card (an 80 GB
    card when none is given)."""
    precision = "bf16 autocast" if est.device_type == "cuda" else "float32"
    crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.n_crops, cfg.size_crops))
    lines = [f"memory per process, {label}: {cfg.arch}, {est.batch} images per micro-batch"
             f"{f' x {cfg.grad_accum} accumulated' if cfg.grad_accum > 1 else ''}, {crops} "
             f"crops, {precision} on {est.device_type}"
             f"{', activation checkpointing' if cfg.checkpoint_activations else ''}"]
    for name, value in est.rows():
        if value:
            lines.append(f"  {name:<44} {gib(value):>10}")
    lines.append(f"  {'total (estimate)':<44} {gib(est.total):>10}")
    if est.host_pinned:
        lines.append(f"  (and {gib(est.host_pinned)} of pinned host memory for the loader's "
                     f"canvas buffers, per process)")
    lines.append(f"  ({est.activations_per_image / 2 ** 20:.1f} MiB saved per multi-crop image, "
                 f"measured on the model at {_PROBE_BATCHES[0]} and {_PROBE_BATCHES[1]} images)")
    for name, capacity in capacities or [("an 80 GB card", CARD_80GB_BYTES)]:
        free = 1.0 - est.total / capacity
        if est.total > capacity:
            lines.append(f"{name} ({gib(capacity)}): DOES NOT FIT, {gib(est.total - capacity)} "
                         f"over; lower it with {ways_out(cfg)}")
        else:
            lines.append(f"{name} ({gib(capacity)}): fits, {free:.0%} left"
                         + ("" if free >= PRESET_HEADROOM
                            else f" (under the {PRESET_HEADROOM:.0%} headroom the presets keep)"))
    return "\n".join(lines)


def ways_out(cfg) -> str:
    """What lowers the estimate, for an error line."""
    ways = []
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        ways.append(f"--batch_size={half} --grad_accum={cfg.grad_accum * 2} "
                    "(the same global batch)")
    if not cfg.checkpoint_activations:
        ways.append("--checkpoint_activations=true")
    return " or ".join(ways) or "a card with more memory"


def device_capacity(device: torch.device) -> Optional[Tuple[str, int]]:
    """(name, total bytes) of a CUDA device; None elsewhere (host memory is not checked)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} (cuda:{device.index or 0})", int(props.total_memory)


def does_not_fit(est: MemoryEstimate, cfg, capacity: Tuple[str, int]) -> Optional[str]:
    """The one-line refusal when ``est`` exceeds the card, else None."""
    name, total = capacity
    if est.total <= total:
        return None
    return (f"this recipe needs an estimated {gib(est.total)} per GPU ({gib(est.activations)} "
            f"of activations for {est.batch} images per micro-batch) and {name} has "
            f"{gib(total)}: use {ways_out(cfg)} (python -m fastswav.info --memory shows the "
            "estimate by part)")
