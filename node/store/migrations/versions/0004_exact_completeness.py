"""Exact study completeness: studies.complete_at / complete_rule / expected_instances, mpps

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 13:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('complete_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('complete_rule', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('expected_instances', sa.Integer(), nullable=True))

    op.create_table('mpps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('referenced', sa.JSON(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('mpps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mpps_study_instance_uid'), ['study_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('mpps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mpps_study_instance_uid'))

    op.drop_table('mpps')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('expected_instances')
        batch_op.drop_column('complete_rule')
        batch_op.drop_column('complete_at')
