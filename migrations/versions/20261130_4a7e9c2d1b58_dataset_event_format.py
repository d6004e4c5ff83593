"""datasets: the event format and the Schema Registry subject

Revision ID: 4a7e9c2d1b58
Revises: 8c4d2e6f1a37
Create Date: 2026-11-30 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4a7e9c2d1b58"
down_revision: str | None = "8c4d2e6f1a37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "datasets",
        sa.Column("format", sa.String(20), nullable=False, server_default="json"),
    )
    op.add_column("datasets", sa.Column("subject", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("datasets", "subject")
    op.drop_column("datasets", "format")
