"""Migrations on a database of their own: the `billing_admin` role comes and goes safely."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from billing.db.migrate import downgrade, upgrade


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """A new, unmigrated database on the suite's server, dropped afterwards."""
    name = f"billing_migrations_{uuid.uuid4().hex[:10]}"
    admin = _dsn(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


SEED = """
INSERT INTO orgs (id, uid, name) VALUES (1, 'uid-1', 'Acme');
INSERT INTO users (id, email, first_name, last_name) VALUES
    (1, 'owner@acme.test', '', ''), (2, 'admin@acme.test', '', '');
INSERT INTO memberships (org_id, user_id, role) VALUES (1, 1, 'owner');
"""
ADD_ADMIN = "INSERT INTO memberships (org_id, user_id, role) VALUES (1, 2, 'billing_admin')"
ROLE_OF_ADMIN = "SELECT role FROM memberships WHERE user_id = 2"


def test_billing_admin_role_migration_up_and_down(empty_database: str) -> None:
    engine = create_engine(empty_database)
    try:
        upgrade(empty_database, "0001")
        with engine.begin() as conn:
            for statement in SEED.strip().split(";\n"):
                conn.execute(text(statement))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(ADD_ADMIN))

        upgrade(empty_database, "0004_billing_admin_role")
        with engine.begin() as conn:
            conn.execute(text(ADD_ADMIN))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE memberships SET role = 'admin' WHERE user_id = 2"))

        # Down again: the billing admin stays in the org, as a plain member.
        downgrade(empty_database, "0001")
        with engine.connect() as conn:
            assert conn.scalar(text(ROLE_OF_ADMIN)) == "member"
        upgrade(empty_database)
    finally:
        engine.dispose()


def test_entitlement_migration_up_and_down(empty_database: str) -> None:
    """Existing orgs start entitled; the outbox keeps one row per id and comes and goes."""
    engine = create_engine(empty_database)
    try:
        upgrade(empty_database, "0004_billing_admin_role")
        with engine.begin() as conn:
            for statement in SEED.strip().split(";\n"):
                conn.execute(text(statement))
        upgrade(empty_database, "0007_entitlement")
        with engine.begin() as conn:
            row = conn.execute(text("SELECT entitled, access_until FROM orgs")).one()
            assert tuple(row) == (True, None)
            insert = (
                "INSERT INTO notifications (id, org_id, type, body, status, attempts) "
                "VALUES (:id, 1, 'org.billing.status_changed', '{}', 'pending', 0)"
            )
            conn.execute(text(insert), {"id": "msg_1"})
            conn.execute(text(insert), {"id": "msg_2"})
            positions = conn.execute(text("SELECT position FROM notifications ORDER BY id")).all()
            assert positions[0][0] < positions[1][0]
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(insert), {"id": "msg_1"})
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(insert.replace("'pending'", "'lost'")), {"id": "msg_3"})

        downgrade(empty_database, "0004_billing_admin_role")
        with engine.begin() as conn:
            columns = conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = 'orgs'")
            ).scalars()
            assert not {"entitled", "access_until"} & set(columns)
            assert conn.execute(text("SELECT to_regclass('notifications')")).scalar() is None
        upgrade(empty_database, "head")
    finally:
        engine.dispose()


def test_service_api_migration_up_and_down(empty_database: str) -> None:
    engine = create_engine(empty_database)
    item = "INSERT INTO request_log (org_id, count, item_id) VALUES (1, 1, 'item-1')"
    try:
        upgrade(empty_database, "0004_billing_admin_role")
        with engine.begin() as conn:
            for statement in SEED.strip().split(";\n"):
                conn.execute(text(statement))
        upgrade(empty_database, "0006_service_api")
        with engine.begin() as conn:
            conn.execute(text(item))
            conn.execute(text("UPDATE orgs SET closed_at = now() WHERE id = 1"))
            conn.execute(text("UPDATE users SET external_id = 'ext-1' WHERE id = 1"))
            # Rows the host application writes have no item id: never in conflict.
            for _ in range(2):
                conn.execute(text("INSERT INTO request_log (org_id, count) VALUES (1, 1)"))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(item))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE users SET external_id = 'ext-1' WHERE id = 2"))

        downgrade(empty_database, "0004_billing_admin_role")
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM request_log")) == 3
        upgrade(empty_database)
    finally:
        engine.dispose()
