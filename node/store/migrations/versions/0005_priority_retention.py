"""Job priorities and retention: jobs.priority (claim order), studies.purged_at

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 14:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('priority', sa.Integer(), server_default='100', nullable=False)
        )
        batch_op.drop_index('ix_jobs_claim')
        batch_op.create_index(
            'ix_jobs_claim', ['kind', 'status', 'priority', 'not_before'], unique=False
        )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('purged_at')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_claim')
        batch_op.create_index('ix_jobs_claim', ['kind', 'status', 'not_before'], unique=False)
        batch_op.drop_column('priority')
