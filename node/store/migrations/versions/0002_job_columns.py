"""Send jobs: destination and result SOP Instance UID as columns; infer attempts

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 13:50:00.000000

Clean-up and the sender's claims read these instead of parsing idempotency keys or
JSON payloads.  Existing send jobs get them from their payloads.  Unfinished infer
jobs get the ``infer`` kind's attempts (3, ``node.store.jobs.retry_policies``), which
every stage now reads from the job row.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_jobs = sa.table(
    'jobs',
    sa.column('id', sa.Integer()),
    sa.column('kind', sa.String()),
    sa.column('status', sa.String()),
    sa.column('payload', sa.JSON()),
    sa.column('max_attempts', sa.Integer()),
    sa.column('destination', sa.String()),
    sa.column('result_sop_instance_uid', sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination', sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column('result_sop_instance_uid', sa.String(length=64), nullable=True)
        )
        batch_op.create_index(batch_op.f('ix_jobs_destination'), ['destination'], unique=False)
        batch_op.create_index(
            batch_op.f('ix_jobs_result_sop_instance_uid'), ['result_sop_instance_uid'],
            unique=False,
        )
    conn = op.get_bind()
    rows = conn.execute(sa.select(_jobs.c.id, _jobs.c.payload).where(_jobs.c.kind == 'send'))
    for job_id, payload in rows.all():
        payload = payload if isinstance(payload, dict) else {}
        dest, uid = payload.get('destination'), payload.get('sop_instance_uid')
        conn.execute(
            _jobs.update()
            .where(_jobs.c.id == job_id)
            .values(
                destination=str(dest)[:64] if dest is not None else None,
                result_sop_instance_uid=str(uid)[:64] if uid is not None else None,
            )
        )
    conn.execute(
        _jobs.update()
        .where(
            _jobs.c.kind == 'infer',
            _jobs.c.status.in_(('queued', 'running', 'failed')),
            _jobs.c.max_attempts > 3,
        )
        .values(max_attempts=3)
    )


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_result_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_jobs_destination'))
        batch_op.drop_column('result_sop_instance_uid')
        batch_op.drop_column('destination')
