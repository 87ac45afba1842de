"""device certificate issuer

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows stay NULL: before this revision there was one device CA,
    # so they belong to the oldest one.
    with op.batch_alter_table("devicecertificate", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("issuer_fingerprint", sa.String(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("devicecertificate", schema=None) as batch_op:
        batch_op.drop_column("issuer_fingerprint")
