"""monitoring: variant_metrics summed per hour (variant_metrics_hourly)

A deployment's metrics over a week summed ~10,000 minute rows per variant and request (50 JSONB
histogram bins each). The monitor now adds each flush's deltas to the minute rows and to this
hourly rollup in the same transaction, and long windows read whole hours here plus the minutes
of their ragged edges (carrara.monitoring.rollup). Histograms are bigint arrays of every bin.

The upgrade fills the rollup from the minute rows already stored, with `variant_metrics` locked
against writes meanwhile (SHARE mode: reads go on). Monitors of an older version keep writing
minute rows only: upgrade them with the API (or run `carrara.monitoring.rollup.rebuild_hourly`).

Revision ID: 5d8a1c3e7f20
Revises: 9b2e5c7d1f04
Create Date: 2026-11-30 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5d8a1c3e7f20"
down_revision: str | None = "9b2e5c7d1f04"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Bin counts when this revision was written (models.monitoring): 20 score bins, 12 latency edges
# + overflow, 16 end-to-end edges + overflow.
BINS = {"score_histogram": 20, "latency_histogram": 13, "end_to_end_histogram": 17}
SUMS = (
    "predictions",
    "dead_letters",
    "score_sum",
    "outcomes",
    "correct",
    "log_loss_sum",
    "squared_error_sum",
    "absolute_error_sum",
)


def upgrade() -> None:
    big = sa.BigInteger()
    op.create_table(
        "variant_metrics_hourly",
        sa.Column("deployment", sa.String(length=100), nullable=False),
        sa.Column("variant", sa.String(length=100), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("newest_minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("predictions", big, nullable=False),
        sa.Column("dead_letters", big, nullable=False),
        sa.Column("score_sum", sa.Float(), nullable=False),
        sa.Column("score_histogram", postgresql.ARRAY(big), nullable=False),
        sa.Column("latency_histogram", postgresql.ARRAY(big), nullable=False),
        sa.Column("end_to_end_histogram", postgresql.ARRAY(big), nullable=False),
        sa.Column("outcomes", big, nullable=False),
        sa.Column("correct", big, nullable=False),
        sa.Column("log_loss_sum", sa.Float(), nullable=False),
        sa.Column("squared_error_sum", sa.Float(), nullable=False),
        sa.Column("absolute_error_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(
            "deployment", "variant", "bucket_start", name=op.f("pk_variant_metrics_hourly")
        ),
    )
    op.create_index(
        "ix_variant_metrics_hourly_deployment_bucket",
        "variant_metrics_hourly",
        ["deployment", "bucket_start"],
        unique=False,
    )
    histograms = ", ".join(
        "ARRAY["
        + ", ".join(f"coalesce(sum(({column} ->> {k})::bigint), 0)" for k in range(size))
        + "]::bigint[]"
        for column, size in BINS.items()
    )
    sums = ", ".join(f"sum({column})" for column in SUMS)
    op.execute("LOCK TABLE variant_metrics IN SHARE MODE")
    op.execute(
        "INSERT INTO variant_metrics_hourly (deployment, variant, bucket_start, newest_minute, "  # noqa: S608
        f"model_version, shadow, {', '.join(SUMS)}, {', '.join(BINS)}) "
        "SELECT deployment, variant, date_trunc('hour', bucket_start, 'UTC'), max(bucket_start), "
        "(array_agg(model_version ORDER BY bucket_start DESC))[1], bool_or(shadow), "
        f"{sums}, {histograms} FROM variant_metrics GROUP BY 1, 2, 3"
    )


def downgrade() -> None:
    op.drop_index(
        "ix_variant_metrics_hourly_deployment_bucket", table_name="variant_metrics_hourly"
    )
    op.drop_table("variant_metrics_hourly")
