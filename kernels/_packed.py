"""Unpacking of the constexpr index maps built by ``_common.pack_crops`` / ``pack_slots``."""
import triton
import triton.language as tl

from . import _common

_CROP_BITS = tl.constexpr(_common.CROP_BITS)
_CROP_MASK = tl.constexpr((1 << _common.CROP_BITS) - 1)
_SLOT_BITS = tl.constexpr(_common.SLOT_BITS)
_SLOT_MASK = tl.constexpr((1 << _common.SLOT_BITS) - 1)


@triton.jit
def crop_of_slot(PACKED_CROPS: tl.constexpr, slot):
    """Crop index of assigned-crop slot ``slot`` (a constexpr or a program id)."""
    packed = tl.full([], PACKED_CROPS, tl.int64)
    return ((packed >> (slot * _CROP_BITS)) & _CROP_MASK).to(tl.int32)


@triton.jit
def slot_of_group(PACKED_SLOTS: tl.constexpr, group):
    """Slot of crop (or queue segment) ``group``, -1 where it has none."""
    packed = tl.full([], PACKED_SLOTS, tl.int64)
    return ((packed >> (group * _SLOT_BITS)) & _SLOT_MASK).to(tl.int32) - 1
