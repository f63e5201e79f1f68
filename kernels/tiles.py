"""Tile sizes of every fused-loss launch, chosen in one place from the shapes.

The rule, for a GPU target: start from the largest tile that compiles without spills at
sm_80/sm_90 (checked by ``python -m fastswav.kernels.compile_report``) and halve its rows
(then its prototype columns) until the launch has at least ``MIN_PROGRAMS`` programs, two
per SM of an H100 (132 SMs), so that the small batches (B = 64) still fill the card.
Under the Triton interpreter the tiles are small, so that tests with small shapes still
cover several blocks and ragged edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

# Two programs per SM of an H100 SXM (132 SMs).
MIN_PROGRAMS = 264


@dataclass(frozen=True)
class Tile:
    rows: int      # BLOCK_R: rows (samples) of scores per tile
    cols: int      # BLOCK_K: prototype columns per tile
    warps: int = 4


@dataclass(frozen=True)
class LossTiles:
    scores: Tile        # score matmul + epilogue statistics; grid (rows, K, groups)
    score_d: int        # BLOCK_D of the score matmul
    row_sums: Tile      # Sinkhorn sample sums; grid (rows, K, slots)
    last_row_sums: Tile  # the last sample sums, of the batch rows only
    col_sums: Tile      # Sinkhorn prototype sums; grid (row chunks, K, slots)
    col_rows_per_program: int
    one_launch_rounds: bool  # Sinkhorn rounds in one launch (sinkhorn_pass) with pass_tile
    pass_tile: Tile
    ce_forward: Tile    # codes + cross-entropy partials; grid (rows, K)
    ce_backward: Tile   # dS of every crop; grid (rows, K)


def _programs(rows: int, cols: int, tile: Tile, extra: int) -> int:
    return triton.cdiv(rows, tile.rows) * triton.cdiv(cols, tile.cols) * extra


def _fit(rows: int, cols: int, extra: int, largest: Tile, smallest_rows: int = 16,
         smallest_cols: int = 64) -> Tile:
    """``largest`` shrunk (rows first) until the grid has MIN_PROGRAMS programs."""
    tile = largest
    while _programs(rows, cols, tile, extra) < MIN_PROGRAMS:
        if tile.rows > smallest_rows:
            tile = Tile(tile.rows // 2, tile.cols, tile.warps)
        elif tile.cols > smallest_cols:
            tile = Tile(tile.rows, tile.cols // 2, tile.warps)
        else:
            break
    return tile


def loss_tiles(gpu: bool, *, batch: int, n_protos: int, dim: int, n_crops: int,
               n_assign: int, queue_len: int = 0, precision: str = "tf32") -> LossTiles:
    """Tiles of the fused SwAV loss at one shape (``gpu``: compiled for a GPU).

    ``precision="ieee"`` multiplies on the FMA pipes, whose 64 x 64 float32 tile spilled:
    it takes 32-row tiles and a shorter step over D; ``"tf32x3"`` the shorter step.
    """
    if not gpu:
        small = Tile(16, 32)
        # the interpreter covers both Sinkhorn schemes: one launch a round with a queue
        return LossTiles(scores=small, score_d=min(128, triton.next_power_of_2(max(dim, 16))),
                         row_sums=small, last_row_sums=small, col_sums=small,
                         col_rows_per_program=32,
                         one_launch_rounds=queue_len > 0, pass_tile=small,
                         ce_forward=small, ce_backward=small)
    if precision == "ieee":
        score_d = min(32, triton.next_power_of_2(max(dim, 16)))
        scores = _fit(batch, n_protos, n_crops, Tile(32, 64, 4), smallest_rows=32)
    elif precision == "tf32x3":  # three products in flight: spilled at BLOCK_D 64 on sm_80
        score_d = min(32, triton.next_power_of_2(max(dim, 16)))
        scores = _fit(batch, n_protos, n_crops, Tile(64, 64, 4), smallest_rows=64)
    else:
        score_d = min(64, triton.next_power_of_2(max(dim, 16)))
        scores = _fit(batch, n_protos, n_crops, Tile(64, 64, 4), smallest_rows=64)
    seg_rows = queue_len + batch  # rows of one Sinkhorn segment (queue, then batch)
    row_sums = _fit(seg_rows, n_protos, n_assign, Tile(32, 128, 4))
    last_row_sums = _fit(batch, n_protos, n_assign, Tile(32, 128, 4))
    col_sums = Tile(16, 128, 4)
    # Prototype sums reduce over rows: each program walks a chunk of rows, as few chunks
    # as fill the card (fewer partial sums to add afterwards).
    chunks_needed = triton.cdiv(MIN_PROGRAMS, triton.cdiv(n_protos, col_sums.cols) * n_assign)
    chunk = triton.cdiv(triton.cdiv(seg_rows, max(1, chunks_needed)), col_sums.rows) * col_sums.rows
    # A round in one launch reads the scores once from DRAM instead of twice, but only
    # parallelises over row blocks: worth it when those alone fill the card.
    pass_tile = Tile(16, 128, 4)
    one_launch = triton.cdiv(seg_rows, pass_tile.rows) * n_assign >= MIN_PROGRAMS
    # These hold a tile of every crop in flight: 32 x 128 spilled at 8 crops (sm_90).
    ce_forward = _fit(batch, n_protos, 1, Tile(16, 128, 4))
    ce_backward = _fit(batch, n_protos, 1, Tile(16, 128, 4))
    return LossTiles(scores=scores, score_d=score_d, row_sums=row_sums,
                     last_row_sums=last_row_sums, col_sums=col_sums,
                     col_rows_per_program=max(col_sums.rows, chunk),
                     one_launch_rounds=one_launch, pass_tile=pass_tile, ce_forward=ce_forward,
                     ce_backward=ce_backward)
