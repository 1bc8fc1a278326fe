"""Calibration plumbing shared by every calibration-based method (GPTQ, and later SparseGPT,
Wanda, AWQ): the block-by-block runner (:mod:`compactml.calib.capture`) and the input
statistics it accumulates (:mod:`compactml.calib.stats`)."""

from __future__ import annotations

from compactml.calib.capture import Block, Call, collect, find_blocks, run_blockwise
from compactml.calib.stats import ChannelStats, HessianStats

__all__ = [
    "Block",
    "Call",
    "ChannelStats",
    "HessianStats",
    "collect",
    "find_blocks",
    "run_blockwise",
]
