"""The catalogue of algorithms the platform trains: the dataset tasks each supports and its params.

Params are pydantic models with bounds and defaults; `extra="forbid"` makes a misspelt parameter an
error instead of a silently ignored setting. The API validates a run's params here, stores the
validated params with every default filled in (so a run is reproducible even if a default later
changes), and publishes the JSON schemas so UI forms can be generated from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from carrara.errors import Invalid

TASKS = ("binary", "multiclass", "regression", "anomaly")
LABELLED_TASKS = ("binary", "multiclass", "regression")
SEED_MAX = 2**32 - 1  # numpy and the boosting libraries take 32-bit unsigned seeds


class CommonParams(BaseModel):
    """Params every algorithm accepts."""

    # allow_inf_nan=False: Python's JSON parser accepts `Infinity`/`NaN`, Postgres JSONB does not.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bad_event_threshold: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fraction of replayed events that may fail to decode or validate before the "
        "run fails (0 = any bad event fails the run).",
    )
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Random seed, for reproducible runs.")


class LogisticRegressionParams(CommonParams):
    C: float = Field(1.0, gt=0, le=1e6, description="Inverse regularisation strength.")
    max_iter: int = Field(1000, ge=1, le=100_000, description="Maximum solver iterations.")
    class_weight: Literal["balanced"] | None = Field(
        None, description="`balanced` reweights classes inversely to their frequency."
    )


class LinearRegressionParams(CommonParams):
    alpha: float = Field(
        0.0, ge=0, le=1e6, description="L2 (ridge) regularisation; 0 = ordinary least squares."
    )
    fit_intercept: bool = True


class RandomForestParams(CommonParams):
    n_estimators: int = Field(200, ge=1, le=5000, description="Number of trees.")
    max_depth: int | None = Field(None, ge=1, le=1000, description="None = grow until pure.")
    min_samples_leaf: int = Field(1, ge=1, le=1_000_000)
    max_features: float = Field(
        1.0, gt=0, le=1, description="Fraction of features considered at each split."
    )
    class_weight: Literal["balanced"] | None = None


class HistGradientBoostingParams(CommonParams):
    max_iter: int = Field(200, ge=1, le=100_000, description="Number of boosting iterations.")
    learning_rate: float = Field(0.1, gt=0, le=1)
    max_depth: int | None = Field(None, ge=1, le=1000, description="None = no depth limit.")
    max_leaf_nodes: int = Field(31, ge=2, le=131_072)
    min_samples_leaf: int = Field(20, ge=1, le=1_000_000)
    l2_regularization: float = Field(0.0, ge=0, le=1e6)
    early_stopping: bool = True


class LightGBMParams(CommonParams):
    n_estimators: int = Field(500, ge=1, le=5000, description="Number of boosting rounds.")
    learning_rate: float = Field(0.05, gt=0, le=1)
    num_leaves: int = Field(31, ge=2, le=131_072)
    max_depth: int | None = Field(None, ge=1, le=1000, description="None = no depth limit.")
    min_child_samples: int = Field(20, ge=1, le=1_000_000)
    subsample: float = Field(1.0, gt=0, le=1, description="Row fraction sampled per round.")
    colsample_bytree: float = Field(1.0, gt=0, le=1, description="Feature fraction per tree.")
    reg_lambda: float = Field(0.0, ge=0, le=1e6)


class XGBoostParams(CommonParams):
    n_estimators: int = Field(500, ge=1, le=5000, description="Number of boosting rounds.")
    learning_rate: float = Field(0.1, gt=0, le=1)
    max_depth: int = Field(6, ge=1, le=100)
    min_child_weight: float = Field(1.0, ge=0, le=1e6)
    subsample: float = Field(1.0, gt=0, le=1, description="Row fraction sampled per round.")
    colsample_bytree: float = Field(1.0, gt=0, le=1, description="Feature fraction per tree.")
    reg_lambda: float = Field(1.0, ge=0, le=1e6)


class AutoencoderParams(CommonParams):
    hidden_layers: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        [32, 8, 32],  # pydantic copies mutable defaults; a literal shows up in the JSON schema
        min_length=1,
        max_length=20,
        description="Units per hidden layer, encoder then decoder (e.g. [32, 8, 32]).",
    )
    epochs: int = Field(50, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    learning_rate: float = Field(0.001, gt=0, le=1)
    target_alert_rate: float = Field(
        0.01,
        gt=0,
        le=0.5,
        description="Fraction of events to flag: the reconstruction-error threshold is chosen "
        "so that this share of the training events would alert.",
    )


class AutoParams(CommonParams):
    time_budget_s: int = Field(
        600, ge=10, le=86_400, description="Wall-clock budget for the search, in seconds."
    )
    max_trials: int = Field(100, ge=1, le=10_000, description="Most candidate models to try.")


@dataclass(frozen=True)
class Algorithm:
    name: str
    title: str
    description: str
    tasks: tuple[str, ...]
    params_model: type[CommonParams]

    def params_schema(self) -> dict[str, Any]:
        """The JSON schema of this algorithm's params (what UI forms are generated from)."""
        return self.params_model.model_json_schema()


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "logistic_regression",
            "Logistic regression",
            "A linear classifier; fast, well calibrated, a strong baseline.",
            ("binary", "multiclass"),
            LogisticRegressionParams,
        ),
        Algorithm(
            "linear_regression",
            "Linear regression",
            "Least squares (ridge when alpha > 0).",
            ("regression",),
            LinearRegressionParams,
        ),
        Algorithm(
            "random_forest",
            "Random forest",
            "Bagged decision trees.",
            LABELLED_TASKS,
            RandomForestParams,
        ),
        Algorithm(
            "hist_gradient_boosting",
            "Histogram gradient boosting",
            "scikit-learn's gradient boosting on binned features; handles missing values.",
            LABELLED_TASKS,
            HistGradientBoostingParams,
        ),
        Algorithm(
            "lightgbm",
            "LightGBM",
            "Leaf-wise gradient boosting.",
            LABELLED_TASKS,
            LightGBMParams,
        ),
        Algorithm(
            "xgboost",
            "XGBoost",
            "Depth-wise gradient boosting.",
            LABELLED_TASKS,
            XGBoostParams,
        ),
        Algorithm(
            "autoencoder",
            "Autoencoder",
            "Anomaly detection by reconstruction error; trained on the events alone, so it also "
            "fits labelled binary datasets (the labels are then used for evaluation only).",
            ("anomaly", "binary"),
            AutoencoderParams,
        ),
        Algorithm(
            "auto",
            "Automatic",
            "Searches the algorithms suited to the dataset's task within a time budget.",
            LABELLED_TASKS,
            AutoParams,
        ),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The catalogue entry of `name`; 422 listing the known algorithms if there is none."""
    algorithm = ALGORITHMS.get(name)
    if algorithm is None:
        raise Invalid(f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return algorithm


def algorithms_for(task: str) -> list[str]:
    """Names of the algorithms that can train on a dataset of `task`."""
    return [a.name for a in ALGORITHMS.values() if task in a.tasks]


def validate_params(algorithm: str, task: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` checked for `algorithm` on a dataset of `task`, with every default filled in."""
    entry = get_algorithm(algorithm)
    if task not in TASKS:
        raise Invalid(f"unknown dataset task {task!r}; known tasks: {', '.join(TASKS)}")
    if task not in entry.tasks:
        raise Invalid(
            f"algorithm {algorithm!r} cannot train on a {task} dataset: it supports "
            f"{', '.join(entry.tasks)}; algorithms for {task}: {', '.join(algorithms_for(task))}"
        )
    try:
        model = entry.params_model.model_validate(params)
    except ValidationError as exc:
        known = ", ".join(entry.params_model.model_fields)
        errors = []
        for error in exc.errors():
            field = ".".join(["params", *(str(part) for part in error["loc"])])
            if error["type"] == "extra_forbidden":
                message = f"unknown parameter for {algorithm} (known: {known})"
            else:
                message = error["msg"]
            errors.append({"field": field, "message": message})
        raise Invalid(
            "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        ) from exc
    return model.model_dump(mode="json")
