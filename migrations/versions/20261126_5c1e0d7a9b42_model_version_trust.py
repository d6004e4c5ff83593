"""model versions: artifact digests, trusted code, origin

Revision ID: 5c1e0d7a9b42
Revises: 9767b09cdc05
Create Date: 2026-11-26 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5c1e0d7a9b42"
down_revision: str | None = "9767b09cdc05"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "model_versions",
        sa.Column("artifact_digests", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "model_versions",
        sa.Column("trusted_code", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column("model_versions", sa.Column("origin", sa.String(length=20), nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "origin")
    op.drop_column("model_versions", "trusted_code")
    op.drop_column("model_versions", "artifact_digests")
