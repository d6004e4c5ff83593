"""ONNX export of trained models, with a parity check before anyone may rely on it.

The scorer prefers ONNX Runtime (much faster per row than the native libraries here), but only for
a version whose ONNX scores matched the native ones on the holdout within `PARITY_TOLERANCE`.
Inputs are float32 in ONNX; the parity check feeds the native model the same float32-rounded values
so that only the runtimes are compared, not the rounding of the inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from carrara.training.trainers import TrainedModel

PARITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class OnnxExport:
    model_bytes: bytes | None
    # Why there is no ONNX artifact (family not convertible, conversion error, parity failed).
    skipped_reason: str | None
    max_abs_diff: float | None


def _pythonic(value: Any) -> Any:
    """numpy scalars as Python values, and booleans as ints (ONNX attributes have no bool type)."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biu":
        return [_pythonic(v) for v in value.tolist()]
    if isinstance(value, list | tuple) and any(isinstance(v, bool | np.generic) for v in value):
        return [_pythonic(v) for v in value]
    return value


@contextmanager
def _python_typed_attributes() -> Iterator[None]:
    """Cast numpy ints/bools in node attributes to Python ints while converting.

    skl2onnx 1.20 with onnx 1.2x builds HistGradientBoosting's tree attributes from numpy ints and
    bools, which onnx refuses ("Expected an int, got a boolean").
    """
    from skl2onnx.common._container import ModelComponentContainer

    original = ModelComponentContainer.add_node

    def add_node(self: Any, *args: Any, **attrs: Any) -> Any:
        keep = {"op_domain", "op_version", "name"}
        cleaned = {k: v if k in keep else _pythonic(v) for k, v in attrs.items()}
        return original(self, *args, **cleaned)

    ModelComponentContainer.add_node = add_node
    try:
        yield
    finally:
        ModelComponentContainer.add_node = original


def _convert_sklearn(trained: TrainedModel) -> bytes:
    from onnx import ModelProto
    from skl2onnx import to_onnx

    sample = np.zeros((1, trained.n_features), dtype=np.float32)
    options: dict[Any, Any] = {}
    if trained.task in ("binary", "multiclass"):
        final = trained.estimator[-1] if hasattr(trained.estimator, "steps") else trained.estimator
        options = {id(final): {"zipmap": False}}
    with _python_typed_attributes():
        onx = to_onnx(trained.estimator, sample, options=options, target_opset=17)
    if not isinstance(onx, ModelProto):  # a tuple or an estimator only when asked for those
        raise TypeError(f"skl2onnx returned {type(onx).__name__}, not an ONNX model")
    return onx.SerializeToString()


def _convert_boosting(trained: TrainedModel) -> bytes:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial_types = [("input", FloatTensorType([None, trained.n_features]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if trained.flavor == "lightgbm":
            onx = onnxmltools.convert_lightgbm(
                trained.estimator, initial_types=initial_types, zipmap=False, target_opset=15
            )
        else:
            onx = onnxmltools.convert_xgboost(
                trained.estimator, initial_types=initial_types, target_opset=15
            )
    return onx.SerializeToString()


class OnnxScorer:
    """Scores with ONNX Runtime following the TrainedModel contract (single-threaded)."""

    def __init__(self, model_bytes: bytes, task: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # converters declare shapes loosely; warnings are noise
        self._session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.task = task

    def scores(self, features: np.ndarray) -> np.ndarray:
        outputs = self._session.run(None, {self._input: features.astype(np.float32, copy=False)})
        if self.task == "regression":
            return np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        proba = np.asarray(outputs[-1] if len(outputs) > 1 else outputs[0], dtype=np.float64)
        return proba[:, 1] if self.task == "binary" else proba


def export_onnx(trained: TrainedModel, holdout: np.ndarray) -> OnnxExport:
    """Convert `trained` to ONNX and keep it only if it matches native scores on `holdout`."""
    if trained.algorithm == "autoencoder":
        return OnnxExport(None, "autoencoder scores are computed natively (no ONNX graph)", None)
    try:
        model_bytes = (
            _convert_sklearn(trained) if trained.flavor == "sklearn" else _convert_boosting(trained)
        )
        onnx_scores = OnnxScorer(model_bytes, trained.task).scores(holdout)
    except Exception as exc:  # a conversion failure only means "no ONNX", never a failed run
        return OnnxExport(None, f"conversion failed: {type(exc).__name__}: {exc}"[:500], None)
    rounded = holdout.astype(np.float32).astype(np.float64)
    native = trained.scores(rounded)
    diff = float(np.max(np.abs(native - onnx_scores))) if len(holdout) else 0.0
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        return OnnxExport(None, f"parity check failed: max |native - onnx| = {diff:.3g}", diff)
    return OnnxExport(model_bytes, None, diff)
