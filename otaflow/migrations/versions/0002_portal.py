"""portal users, failed logins and used form nonces

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import otaflow.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "portaluser",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column(
            "password_hash",
            sa.String(length=200),
            nullable=False,
        ),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column(
            "created_at", otaflow.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "last_login_at", otaflow.models.UTCDateTime(timezone=True), nullable=True
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "failedlogin",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column(
            "client_address",
            sa.String(length=64),
            nullable=False,
        ),
        sa.Column("at", otaflow.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_failed_login_name_at", "failedlogin", ["username", "at"], unique=False
    )
    op.create_index(
        "ix_failed_login_address_at",
        "failedlogin",
        ["client_address", "at"],
        unique=False,
    )
    op.create_table(
        "usedformnonce",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("used_at", otaflow.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )


def downgrade() -> None:
    op.drop_table("usedformnonce")
    op.drop_index("ix_failed_login_address_at", table_name="failedlogin")
    op.drop_index("ix_failed_login_name_at", table_name="failedlogin")
    op.drop_table("failedlogin")
    op.drop_table("portaluser")
