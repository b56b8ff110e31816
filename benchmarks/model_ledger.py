"""``python -m kphi3_bench.model_ledger``: the model-level ledger under its former name, the same
as ``python -m kphi3_bench.ledger --model`` (``kphi3-bench ledger --model``). Its names are kept
here for the commands and scripts that know them; the ledger itself is ``kphi3_bench.ledger``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import ledger
from .ledger import (  # noqa: F401  (the names this module had)
    COMPONENTS, CONFIGS, ELEMENT_SIZE, PATHS, PROJECTIONS, REST, LayerConfig, activation,
    cache_update, decode_attention, decode_layer, dump_json, family_shapes, flash_attention,
    fused_launches, norm_heads_delta_us, outside_layer, path_costs, projection_launches,
    projections, residual_add, rest_of_layer, rms_norm, rope, train_layer)
from .ledger import MODEL_SCHEMA as SCHEMA, LAYER_TABLE_HEADERS as TABLE_HEADERS  # noqa: F401
from .ledger import build_model as build, format_layer_table as format_table  # noqa: F401
from .ledger import layer_markdown as markdown, layer_table_body as table_body  # noqa: F401

PROG = "python -m kphi3_bench.model_ledger"


def build_parser(prog: str = PROG):
    return ledger.build_parser(prog, model=True)


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    return ledger.main(argv, prog, model=True)


if __name__ == "__main__":
    sys.exit(main())
