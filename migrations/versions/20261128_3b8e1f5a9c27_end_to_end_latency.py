"""variant metrics: an end-to-end latency histogram

Revision ID: 3b8e1f5a9c27
Revises: 7d2f4a6c8e13
Create Date: 2026-11-28 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "3b8e1f5a9c27"
down_revision: str | None = "7d2f4a6c8e13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows (and rows a monitor of the previous release writes) read as "no data".
    op.add_column(
        "variant_metrics",
        sa.Column(
            "end_to_end_histogram",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("variant_metrics", "end_to_end_histogram")
