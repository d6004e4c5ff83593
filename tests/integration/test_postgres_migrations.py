"""PostgreSQL is real and the test database is migrated to Alembic's head."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session

from carrara.models import Dataset
from tests.conftest import ROOT


def test_test_database_is_at_head(engine: Engine) -> None:
    heads = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_heads()
    with engine.connect() as conn:
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        server = conn.execute(text("SHOW server_version")).scalar_one()
    assert sorted(current) == sorted(heads)
    assert int(server.split(".")[0]) >= 13
    assert {"datasets", "dataset_versions"} <= set(inspect(engine).get_table_names())


def test_each_test_runs_in_a_rolled_back_transaction(db_session: Session, engine: Engine) -> None:
    db_session.add(
        Dataset(name="rollback-probe", topic="t", key_field="k", task="binary", features=[])
    )
    db_session.commit()  # a savepoint inside the test's transaction
    assert db_session.query(Dataset).filter_by(name="rollback-probe").count() == 1
    with engine.connect() as other:  # another connection cannot see uncommitted work
        visible = other.execute(
            text("SELECT count(*) FROM datasets WHERE name = 'rollback-probe'")
        ).scalar_one()
    assert visible == 0
