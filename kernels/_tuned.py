"""Measured launch configs: the tables `python -m benchmarks tune` writes, read by the launchers.

A table is one JSON file per (family, card): ``kernels/<family>/tuned/<card slug>.json`` (or under
``$MMFAST_TUNED_DIR/<family>/`` when that is set; ``MMFAST_TUNED=0`` ignores every table). It holds the
card's exact name, the driver, the Triton / torch versions and the date it was measured, and per key
(pass | dtype | head-dim bucket | shape class) the winning tiles. A launcher uses an entry only when the
table's card equals the current device's name exactly and the entry fits the kernel's constraints; in
every other case it keeps the static choice of the family's ``_configs.py``. The tuner itself forces a
candidate with `forcing()`, which wins over both.

Shape classes bucket the longer of the two sequence lengths: the tile that wins on CLIP's 77 tokens is
not the one that wins at 16k tokens.
"""
import contextlib
import functools
import json
import os
import re

import torch

SCHEMA = 1
TUNED_PASSES = {"attention": ("fwd", "dkdv", "dq")}  # the Delta pass is a row reduction: nothing to tune
SHAPE_CLASSES = ((256, "L<=256"), (1024, "L<=1024"), (4096, "L<=4096"))
LONGEST_CLASS = "L>4096"
_FORCED = {}  # (family, pass) -> config, set by forcing()


def shape_class(seqlen_q, seqlen_k):
    longest = max(int(seqlen_q), int(seqlen_k))
    return next((name for bound, name in SHAPE_CLASSES if longest <= bound), LONGEST_CLASS)


def card_slug(card):
    return re.sub(r"[^a-z0-9]+", "-", (card or "unknown").lower()).strip("-")[:40]


def tables_dir(family):
    root = os.environ.get("MMFAST_TUNED_DIR")
    if root:
        return os.path.join(root, family)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), family, "tuned")


def table_path(family, card):
    return os.path.join(tables_dir(family), card_slug(card) + ".json")


@functools.lru_cache(maxsize=None)
def _cuda_name(index):
    return torch.cuda.get_device_name(index)


def device_name(device):
    """The card's exact name (what tables are matched on), or None for a device without tables (the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _load(path):
    """Read once per process (launchers look it up on every launch); None when missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_table(family, card):
    """The table for (family, card) when one exists for exactly this card, else None."""
    if card is None or os.environ.get("MMFAST_TUNED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    table = _load(table_path(family, card))
    if table is None or table.get("schema") != SCHEMA or table.get("family") != family or table.get("card") != card:
        return None  # another card whose name slugs alike, or an older format: the static choice is safer
    return table


def key(pass_, dtype, bucket, operands, cls):
    return f"{pass_}|{dtype}|D{bucket}|{operands}|{cls}"


@contextlib.contextmanager
def forcing(family, configs):
    """Launches of `family` inside the block use configs[pass] (the tuner times candidates this way)."""
    saved = {p: _FORCED.get((family, p)) for p in configs}
    _FORCED.update({(family, p): c for p, c in configs.items()})
    try:
        yield
    finally:
        for p, c in saved.items():
            if c is None:
                _FORCED.pop((family, p), None)
            else:
                _FORCED[(family, p)] = c


def attention_key(pass_, kernel, args, head_dim, dtype, precision):
    """The table key of one attention launch (positional `args` as the launcher passes them)."""
    from ._common import DTYPE_NAMES
    from .attention import _configs as C

    names = kernel.arg_names
    seqlen_q = args[names.index("seqlen_q")]
    seqlen_k = args[names.index("seqlen_k")]
    bucket = C.table_bucket(pass_, head_dim)
    return key(pass_, DTYPE_NAMES[dtype], bucket, C.operands(pass_, dtype, precision), shape_class(seqlen_q, seqlen_k))


def attention_config(pass_, kernel, args, head_dim, dtype, precision, interpreter):
    """The launcher's tiles: forced by the tuner, else this card's tuned entry for the launch's key (aligned
    inputs only: the tuner measured aligned ones), else `_configs.launch_config`'s static choice."""
    from .attention import _configs as C

    forced = _FORCED.get(("attention", pass_))
    if forced is not None:
        return forced
    static = C.launch_config(pass_, kernel, args, head_dim, dtype, precision, interpreter)
    if pass_ not in TUNED_PASSES["attention"]:
        return static
    table = load_table("attention", device_name(args[0].device))
    if table is None or not C.is_aligned(kernel, head_dim, args):
        return static
    entry = table["configs"].get(attention_key(pass_, kernel, args, head_dim, dtype, precision))
    if entry is None:
        return static
    cfg = C.TileConfig(**entry["config"])
    mask_m, mask_n = C.mask_tile(interpreter)
    if mask_m % cfg.block_m or mask_n % cfg.block_n:
        return static  # the kernels step through whole block-mask tiles
    return cfg
