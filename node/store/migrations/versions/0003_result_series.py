"""results.series_instance_uid: the result's own series, to find the SR a new one replaces

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 13:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('series_instance_uid', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_results_series_instance_uid'), ['series_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_results_series_instance_uid'))
        batch_op.drop_column('series_instance_uid')
