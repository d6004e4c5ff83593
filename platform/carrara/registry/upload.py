"""Bring your own ONNX model: check an uploaded `.onnx` file against a dataset, register it.

A model trained anywhere (PyTorch, TensorFlow, H2O, scikit-learn...) and exported to ONNX is
uploaded with a declaration (`OnnxDeclaration`): which dataset features feed its input tensor's
columns, in order, and what its output means. Carrara checks it before anything is registered:

1. `onnx.checker` (full check, shape inference), no external data;
2. its input and output names, types and shapes against the declaration;
3. ONNX Runtime on the dataset topic's recent events, decoded as the scorer will decode them:
   outputs of the declared shape, finite, probabilities in [0, 1] (and whether rows with missing
   values score as finite numbers).

Then it is logged to MLflow as an ONNX-flavour model with a Carrara model card (features,
feature spec, task, classes, threshold, input and output names), registered as a new version,
and its files' digests pinned like any other version's; it deploys like a trained version.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from confluent_kafka import KafkaException
from sqlalchemy.orm import Session

from carrara.artifacts import sha256_bytes
from carrara.audit.service import record
from carrara.auth.principal import Principal
from carrara.datasets.service import event_schema, get_dataset
from carrara.errors import Invalid, Unavailable
from carrara.models import Dataset, ModelVersion
from carrara.registry import mlflow_sync
from carrara.registry.schemas import OnnxDeclaration
from carrara.registry.service import register_version
from carrara.streams.event_codec import FeatureError, FeatureSpec
from carrara.streams.event_schema import FeatureType, Task
from carrara.streams.snapshot import TopicNotFound, read_recent_events

ALGORITHM = "onnx-upload"
SAMPLE_EVENTS = 200
SAMPLE_TIMEOUT_S = 10.0
NUMERIC = frozenset({FeatureType.float, FeatureType.int, FeatureType.bool})
TASK_OF_OUTPUT = {
    "probability": "binary",
    "class_scores": "multiclass",
    "regression": "regression",
    "anomaly_score": "anomaly",
}
SCORE_MEANING = {
    "probability": "probability of the positive class",
    "class_scores": "probability per class",
    "regression": "predicted value",
    "anomaly_score": "anomaly score; alert when above threshold",
}
PROBABILITY_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Checked:
    """What the checks learnt of an uploaded model."""

    task: str
    input_name: str
    output_name: str
    spec: FeatureSpec
    example: np.ndarray  # a few sampled rows in the model's input type
    handles_missing: bool
    events_checked: int


def feature_spec_for(dataset: Dataset, declaration: OnnxDeclaration) -> FeatureSpec:
    """How the scorer turns the dataset's events into the model's input rows."""
    types = {f["name"]: FeatureType(f["type"]) for f in dataset.features}
    unknown = [n for n in declaration.features if n not in types]
    if unknown:
        raise Invalid(
            f"dataset '{dataset.name}' has no feature(s) {', '.join(unknown)} "
            f"(its features: {', '.join(types)})"
        )
    not_numeric = [n for n in declaration.features if types[n] not in NUMERIC]
    if not_numeric:
        raise Invalid(
            f"feature(s) {', '.join(not_numeric)} are not numeric (float, int or bool): an "
            "uploaded model takes numbers; encode categories inside the model"
        )
    task = TASK_OF_OUTPUT[declaration.output]
    label_field = dataset.label_field
    if task != "anomaly" and not label_field:
        label_field = "_label"  # the scorer reads no label; the schema needs a name for one
    declared = {f.name: f for f in event_schema(dataset).features}
    schema = replace(
        event_schema(dataset),
        features=tuple(replace(declared[n], type=types[n]) for n in declaration.features),
        task=Task(task),
        label_field=label_field,
        event_time_field=None,
    )
    classes = declaration.classes
    if task == "binary" and classes is None:
        classes = [0, 1]
    try:
        return FeatureSpec.from_dict(
            FeatureSpec(schema, {}, None if classes is None else list(classes)).as_dict()
        )
    except FeatureError as exc:
        raise Invalid(f"the declared features do not make a feature spec: {exc}") from exc


def _load_checked_onnx(model_bytes: bytes) -> Any:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_model_from_string(model_bytes)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # DecodeError, ValidationError, InferenceError...
        raise Invalid(f"the file is not a valid ONNX model: {type(exc).__name__}: {exc}") from exc
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise Invalid("the ONNX model refers to external data files; upload a single file")
    return model


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Invalid(f"ONNX Runtime cannot load the model: {exc}") from exc


def _pick_input(session: Any, declaration: OnnxDeclaration) -> Any:
    inputs = {i.name: i for i in session.get_inputs()}
    if declaration.input_name is not None:
        if declaration.input_name not in inputs:
            raise Invalid(
                f"the model has no input {declaration.input_name!r} (inputs: {', '.join(inputs)})"
            )
        chosen = inputs[declaration.input_name]
    elif len(inputs) == 1:
        chosen = next(iter(inputs.values()))
    else:
        raise Invalid(
            f"the model has {len(inputs)} inputs ({', '.join(inputs)}): the scorer feeds one "
            "(rows, features) tensor; name it with input_name"
        )
    if chosen.type not in ("tensor(float)", "tensor(double)"):
        raise Invalid(f"input {chosen.name!r} is a {chosen.type}; it must be float or double")
    shape = chosen.shape
    width = len(declaration.features)
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width):
        raise Invalid(
            f"input {chosen.name!r} has shape {shape}; the declaration maps {width} features, so "
            f"it must be (rows, {width})"
        )
    if len(inputs) > 1:
        raise Invalid(f"the model has other inputs ({', '.join(inputs)}) the scorer cannot feed")
    return chosen


def _pick_output(session: Any, declaration: OnnxDeclaration) -> str:
    outputs = {o.name: o for o in session.get_outputs()}
    if declaration.output_name is not None:
        if declaration.output_name not in outputs:
            raise Invalid(
                f"the model has no output {declaration.output_name!r} "
                f"(outputs: {', '.join(outputs)})"
            )
        name = declaration.output_name
    elif len(outputs) == 1:
        name = next(iter(outputs))
    else:
        named = [n for n in outputs if "prob" in n.lower()]
        if declaration.output in ("probability", "class_scores") and len(named) == 1:
            name = named[0]
        else:
            raise Invalid(
                f"the model has {len(outputs)} outputs ({', '.join(outputs)}): name the one to "
                "score with in output_name"
            )
    if not outputs[name].type.startswith("tensor("):
        raise Invalid(
            f"output {name!r} is a {outputs[name].type}, not a tensor (for scikit-learn "
            "converters: export classifiers with zipmap disabled)"
        )
    return name


def _scores(values: np.ndarray, declaration: OnnxDeclaration) -> np.ndarray:
    """The output as the scorer reads it (model_loaders.OnnxScorer); Invalid if it cannot."""
    n = values.shape[0] if values.ndim else 0
    if declaration.output in ("regression", "anomaly_score"):
        if (values.ndim == 2 and values.shape[1] != 1) or values.ndim > 2:
            raise Invalid(
                f"a {declaration.output} output must be (rows,) or (rows, 1), got {values.shape}"
            )
        return values.reshape(-1)
    if declaration.output == "probability":
        if values.ndim == 1:
            return values
        if values.ndim == 2 and values.shape[1] in (1, 2):
            return values[:, -1]
        raise Invalid(
            f"a probability output must be (rows,), (rows, 1) or (rows, 2), got {values.shape}"
        )
    columns = len(declaration.classes or [])
    if values.ndim != 2 or values.shape[0] != n or values.shape[1] != columns:
        raise Invalid(
            f"class_scores must be (rows, {columns}) for the {columns} declared classes, got "
            f"{values.shape}"
        )
    return values


def _check_scores(scores: np.ndarray, declaration: OnnxDeclaration, what: str) -> None:
    if not np.all(np.isfinite(scores)):
        raise Invalid(f"the model's {declaration.output} output is not finite on {what}")
    if declaration.output in ("probability", "class_scores") and (
        np.any(scores < 0) or np.any(scores > 1)
    ):
        raise Invalid(f"the model's probabilities are outside [0, 1] on {what}")
    if declaration.output == "class_scores":
        sums = scores.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=PROBABILITY_SUM_TOLERANCE):
            raise Invalid(
                f"class_scores must be probabilities summing to 1 per row; on {what} the rows sum "
                f"to {sums[:5].tolist()}"
            )


def check_model(
    model_bytes: bytes, dataset: Dataset, declaration: OnnxDeclaration, kafka_bootstrap: str
) -> Checked:
    """Run every check of the module docstring; Invalid naming what is wrong."""
    spec = feature_spec_for(dataset, declaration)
    _load_checked_onnx(model_bytes)
    session = _session(model_bytes)
    model_input = _pick_input(session, declaration)
    output = _pick_output(session, declaration)
    dtype = np.float64 if model_input.type == "tensor(double)" else np.float32
    try:
        events = read_recent_events(kafka_bootstrap, dataset.topic, SAMPLE_EVENTS, SAMPLE_TIMEOUT_S)
    except TopicNotFound as exc:
        raise Invalid(f"dataset '{dataset.name}': topic {dataset.topic} does not exist") from exc
    except KafkaException as exc:
        raise Unavailable(f"Kafka did not answer for the dataset's recent events: {exc}") from exc
    rows, _ = spec.encode_values([e.value for e in events])
    if len(rows) == 0:
        raise Invalid(
            f"dataset '{dataset.name}' has no recent valid events on {dataset.topic} to check the "
            "model on; produce some first"
        )

    def run(x: np.ndarray, what: str) -> np.ndarray:
        try:
            (out,) = session.run([output], {model_input.name: x.astype(dtype)})
        except Exception as exc:
            raise Invalid(f"ONNX Runtime failed on {what}: {exc}") from exc
        values = np.asarray(out)
        if values.dtype.kind not in "fiub" or values.ndim == 0 or values.shape[0] != len(x):
            raise Invalid(
                f"output {output!r} gave shape {values.shape} ({values.dtype}) for {len(x)} rows"
            )
        return _scores(values.astype(np.float64), declaration)

    complete = rows[~np.isnan(rows).any(axis=1)]
    if len(complete):
        _check_scores(run(complete, "the dataset's recent events"), declaration, "recent events")
    gaps = np.vstack([rows[np.isnan(rows).any(axis=1)], np.full((1, rows.shape[1]), np.nan)])
    try:
        _check_scores(run(gaps, "rows with missing values"), declaration, "missing values")
        handles_missing = True
    except Invalid:
        handles_missing = False
    if not len(complete) and not handles_missing:
        raise Invalid("every recent event has missing values and the model does not score them")
    example = (complete if len(complete) else rows)[:5].astype(dtype)
    return Checked(
        task=TASK_OF_OUTPUT[declaration.output],
        input_name=model_input.name,
        output_name=output,
        spec=spec,
        example=example,
        handles_missing=handles_missing,
        events_checked=len(rows),
    )


def model_card(declaration: OnnxDeclaration, checked: Checked) -> dict[str, Any]:
    """The Carrara model card of an uploaded model (as model_card.ModelCard reads it)."""
    classes: list[Any] | None = None
    if checked.task == "multiclass":
        classes = list(range(len(declaration.classes or [])))
    elif checked.task == "binary":
        classes = [0, 1]
    return {
        "format": 1,
        "algorithm": ALGORITHM,
        "task": checked.task,
        "flavor": "onnx",
        "feature_names": checked.spec.columns,
        "feature_spec": checked.spec.as_dict(),
        "classes": classes,
        "threshold": declaration.threshold,
        "score": SCORE_MEANING[declaration.output],
        "onnx_input": checked.input_name,
        "onnx_output": checked.output_name,
        "handles_missing": checked.handles_missing,
    }


def _log_and_register(
    tracking_uri: str, name: str, model_bytes: bytes, card: dict[str, Any], checked: Checked
) -> tuple[int, str, str]:
    """Log the model (ONNX flavour) with its card and register it; (version, source, run id)."""
    import mlflow
    import mlflow.onnx as mlflow_onnx
    import onnx
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("carrara/uploads")
    with mlflow.start_run(run_name=f"upload-{name}", tags={"carrara.algorithm": ALGORITHM}) as run:
        mlflow.log_dict(card, "carrara_model.json")
        info = mlflow_onnx.log_model(
            onnx.load_model_from_string(model_bytes),
            name="model",
            input_example=checked.example,
            signature=infer_signature(checked.example),
            save_as_external_data=False,
            pip_requirements=["onnxruntime"],
        )
        run_id = run.info.run_id
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            "carrara.model_card": f"runs:/{run_id}/carrara_model.json",
            "carrara.onnx": "false",
            "carrara.algorithm": ALGORITHM,
            "carrara.uploaded_sha256": sha256_bytes(model_bytes),
        },
    )
    return int(version.version), info.model_uri, run_id


def upload_onnx(
    session: Session,
    *,
    tracking_uri: str,
    kafka_bootstrap: str,
    name: str,
    model_bytes: bytes,
    declaration: OnnxDeclaration,
    actor: Principal,
    max_bytes: int,
) -> ModelVersion:
    """Check `model_bytes` (see module doc), register it as a new version of `name`; audited."""
    if not model_bytes:
        raise Invalid("the uploaded file is empty")
    if len(model_bytes) > max_bytes:
        raise Invalid(f"the model is larger than the upload limit of {max_bytes} bytes")
    dataset = get_dataset(session, declaration.dataset)
    checked = check_model(model_bytes, dataset, declaration, kafka_bootstrap)
    card = model_card(declaration, checked)
    with mlflow_sync.translated(f"the upload of model '{name}'"):
        version, source, _ = _log_and_register(tracking_uri, name, model_bytes, card, checked)
    digests = mlflow_sync.pin_version(tracking_uri, name, version)
    row = register_version(
        session, name, version, None, source, {}, artifact_digests=digests, origin="upload"
    )
    record(
        session,
        actor,
        "model.version.upload",
        "model",
        name,
        after={
            "version": version,
            "uploaded_sha256": sha256_bytes(model_bytes),
            "bytes": len(model_bytes),
            "declaration": declaration.model_dump(mode="json"),
            "events_checked": checked.events_checked,
            "artifact_digests": digests,
        },
    )
    return row
