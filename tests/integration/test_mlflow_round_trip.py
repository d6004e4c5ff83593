"""MLflow is the real tracking server: runs, registry and artifacts all travel over HTTP."""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

from carrara.settings import Settings


def test_log_register_and_load_a_model_through_the_server(
    stack_settings: Settings, mlflow_experiment: str
) -> None:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(200, 3))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    model = LogisticRegression().fit(features, labels)
    name = f"carrara-test-model-{uuid.uuid4().hex[:8]}"

    with mlflow.start_run() as run:
        mlflow.log_param("C", 1.0)
        mlflow.log_metric("train_accuracy", float(model.score(features, labels)))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=features[:2],
            registered_model_name=name,
            pip_requirements=["scikit-learn"],
        )

    client = MlflowClient(stack_settings.mlflow_url)
    logged = client.get_run(run.info.run_id)
    assert logged.data.params["C"] == "1.0"
    assert logged.data.metrics["train_accuracy"] > 0.9
    # Artifacts go through the server's proxy, never a shared local path.
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")

    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]

    loaded = mlflow.sklearn.load_model(f"models:/{name}/1")
    np.testing.assert_allclose(
        loaded.predict_proba(features[:10]), model.predict_proba(features[:10])
    )
    assert str(info.registered_model_version) == "1"
