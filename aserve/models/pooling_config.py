"""How an embedding model pools, from its sentence-transformers files (modules.json and the
Pooling module's config.json), as vLLM reads them.

aserve pools by the last token (what decoder-based embedding models use); a model whose
config asks for another pooling (mean, CLS, max) is refused at start rather than served wrong.
The Normalize module says whether vectors are L2-normalised; without sentence-transformers
files they are (vLLM's default for embeddings).
"""

from __future__ import annotations

import json
import os

_POOLING_MODES = ("pooling_mode_lasttoken", "pooling_mode_mean_tokens", "pooling_mode_cls_token",
                  "pooling_mode_max_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_mean_sqrt_len_tokens")


def normalizes_by_default(model_path: str) -> bool:
    """Whether the model's vectors are L2-normalised; ValueError for a pooling other than the
    last token's."""
    modules_path = os.path.join(model_path, "modules.json")
    if not os.path.isfile(modules_path):
        return True
    with open(modules_path) as f:
        modules = json.load(f)
    normalize = False
    for module in modules if isinstance(modules, list) else []:
        kind = module.get("type", "")
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            _check_last_token(os.path.join(model_path, module.get("path", ""), "config.json"))
    return normalize


def _check_last_token(config_path: str) -> None:
    if not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        config = json.load(f)
    modes = [m.removeprefix("pooling_mode_") for m in _POOLING_MODES if config.get(m)]
    if modes and modes != ["lasttoken"]:
        raise ValueError(f"this model pools by {', '.join(modes)} (its sentence-transformers Pooling config); "
                         "aserve's pooling runner pools by the last token only.")
