"""Names with newlines, escapes and markup are shown, never obeyed, in human output."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from billing.db.models import Org
from tests.cli.conftest import Invoke
from tests.factories.orgs import make_org
from tooling.cli.text import safe

HOSTILE = "Acme\n1 FAKE active\x1b[2J\x1b]0;owned\x07[red]x[/red]\u202eevil"


def test_safe_shows_control_characters_as_escapes() -> None:
    assert safe("plain [b]name[/b]") == "plain [b]name[/b]"
    shown = safe(HOSTILE)
    assert shown.isprintable()
    assert "\\x0a" in shown and "\\x1b" in shown and "\\x07" in shown and "\\u202e" in shown


def test_orgs_list_and_show_print_hostile_names_inert(
    invoke: Invoke, session_factory: sessionmaker[Session]
) -> None:
    org = make_org(session_factory)
    with session_factory() as session:
        row = session.get(Org, org.id)
        assert row is not None
        row.name = HOSTILE
        session.commit()

    for args in (("orgs", "list"), ("orgs", "show", str(org.id))):
        result = invoke(*args, env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in result.stdout
        # One line, escapes visible, markup printed as text rather than obeyed.
        assert "Acme\\x0a1 FAKE active\\x1b[2J\\x1b]0;owned\\x07[red]x[/red]" in result.stdout
