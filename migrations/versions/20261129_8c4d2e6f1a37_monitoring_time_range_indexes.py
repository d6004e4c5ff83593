"""monitoring: indexes for a deployment's time-range queries

`variant_metrics` and `feature_drift` are keyed (deployment, variant|feature, bucket_start): a
window of one deployment ("the last hour") had to walk every bucket the deployment ever had in
the primary key. (deployment, bucket_start) reads only the window. Built CONCURRENTLY, so a
monitor writing aggregates is not blocked while a large table is indexed.

Revision ID: 8c4d2e6f1a37
Revises: 3b8e1f5a9c27
Create Date: 2026-11-29 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "8c4d2e6f1a37"
down_revision: str | None = "3b8e1f5a9c27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_variant_metrics_deployment_bucket", "variant_metrics"),
    ("ix_feature_drift_deployment_bucket", "feature_drift"),
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in INDEXES:
            op.create_index(
                name,
                table,
                ["deployment", "bucket_start"],
                postgresql_concurrently=True,
                if_not_exists=True,
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in INDEXES:
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
