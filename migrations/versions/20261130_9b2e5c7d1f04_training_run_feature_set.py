"""training runs: the dataset's feature-set revision pinned when the run was created

Revision ID: 9b2e5c7d1f04
Revises: 6f3a8d2c4e91
Create Date: 2026-11-30 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9b2e5c7d1f04"
down_revision: str | None = "6f3a8d2c4e91"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "training_runs", sa.Column("feature_set_revision_id", sa.Integer(), nullable=True)
    )
    op.create_foreign_key(
        op.f("fk_training_runs_feature_set_revision_id_feature_set_revisions"),
        "training_runs",
        "feature_set_revisions",
        ["feature_set_revision_id"],
        ["id"],
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_training_runs_feature_set_revision_id_feature_set_revisions"),
        "training_runs",
        type_="foreignkey",
    )
    op.drop_column("training_runs", "feature_set_revision_id")
