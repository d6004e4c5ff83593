"""Model artifacts a scorer may load: their SHA-256 digests and the formats that run no code.

Shared by the processes that write model versions (training, the registry's import and upload)
and the scorers that read them, so both sides agree on one list and one way of hashing. Imports
nothing of Carrara.

**Digests.** When Carrara registers a version it pins the SHA-256 of every file a scorer will
load, keyed by what the file is, never by where a tag says it lives:

- `carrara_model.json`: the model card (the `carrara.model_card` tag's target);
- `onnx/model.onnx`: the parity-checked ONNX export (the `carrara.onnx_artifact` tag's target);
- `model/<path>`: every file of the registered MLflow model directory (`MLmodel`, the model file,
  the input example, ...).

The deployment spec carries those digests to the scorers, which refuse any file that is not
pinned or whose bytes differ (`verify`), so a version changed in MLflow after registration (or a
tag moved to other bytes) is never loaded.

**Formats that run no code.** ONNX (run by ONNX Runtime), LightGBM and XGBoost native model files,
and skops files whose every type is in `SKOPS_ALLOWED_TYPES`: the types skops does not trust by
itself that Carrara's own trainers produce (tests/unit/test_artifacts.py trains every algorithm
and checks). The list is Carrara's; the one MLflow writes into the `MLmodel` file is never read.
Pickle, cloudpickle and pyfunc models (which may bundle code) load only for a version an admin
marked as trusted code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

CARD_KEY = "carrara_model.json"
ONNX_KEY = "onnx/model.onnx"
MODEL_PREFIX = "model/"
DIGEST_PREFIX = "sha256:"
# Files larger than this are not models Carrara can serve from a scorer's memory anyway.
_CHUNK = 1 << 20

# Types in skops files of Carrara's trainers that skops does not trust by default (its defaults
# cover scikit-learn's estimators, numpy arrays and builtins containers). Exact names: no prefix
# matching, no module trusted as a whole.
SKOPS_ALLOWED_TYPES: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "lightgbm.basic.Booster",
        "lightgbm.sklearn.LGBMClassifier",
        "lightgbm.sklearn.LGBMRegressor",
        "numpy.dtype",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.tree._tree.Tree",
    }
)
# XGBoost's native formats and the classes a native file may be loaded into.
XGBOOST_FORMATS = frozenset({"ubj", "json"})
XGBOOST_CLASSES = frozenset(
    {"xgboost.sklearn.XGBClassifier", "xgboost.sklearn.XGBRegressor", "xgboost.core.Booster"}
)
LIGHTGBM_BOOSTER = "lightgbm.basic.Booster"


class DigestMismatch(ValueError):
    """A file's bytes are not the ones pinned at registration (or it was never pinned)."""


def sha256_file(path: Path) -> str:
    """`sha256:<hex>` of the file at `path`."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return DIGEST_PREFIX + digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def directory_digests(root: Path, prefix: str = MODEL_PREFIX) -> dict[str, str]:
    """`prefix + relative path` -> digest of every file under `root` (sorted, POSIX paths)."""
    return {
        prefix + path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def verify(expected: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """DigestMismatch unless every file in `actual` is pinned in `expected` with the same digest."""
    for key, digest in sorted(actual.items()):
        pinned = expected.get(key)
        if pinned is None:
            raise DigestMismatch(f"{key} was not pinned when the version was registered")
        if pinned != digest:
            raise DigestMismatch(
                f"{key} changed since the version was registered (pinned {pinned[:19]}…, "
                f"found {digest[:19]}…)"
            )


def verify_directory(expected: Mapping[str, str], root: Path, prefix: str = MODEL_PREFIX) -> None:
    """`verify` every file under `root`, and that no pinned file under `prefix` is missing."""
    actual = directory_digests(root, prefix)
    verify(expected, actual)
    missing = sorted(k for k in expected if k.startswith(prefix) and k not in actual)
    if missing:
        raise DigestMismatch(f"pinned files are missing: {', '.join(missing[:5])}")


def refused_skops_types(types: list[str]) -> list[str]:
    """The types of a skops file (`skops.io.get_untrusted_types`) outside the allow-list."""
    return sorted(t for t in types if t not in SKOPS_ALLOWED_TYPES)
