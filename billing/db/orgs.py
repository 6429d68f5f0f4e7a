"""Every read and write of orgs, their members and their request log.

The one owner of org data: the API, the CLI and the activities call these
functions rather than query the tables themselves. Each takes an open
`Session` and leaves committing to the caller, so one command (or activity) is
one transaction. Expected failures raise `ServiceError` subclasses whose
message is one sentence a person can act on.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import ColumnElement, Connection, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.db.models import Membership, Org, RequestLog, UsageLedger, User
from billing.domain import (
    GRANTABLE_ROLES,
    FieldDifference,
    MembershipRole,
    OrgProfile,
    SubscriptionSnapshot,
    SubscriptionStatus,
)


class ServiceError(Exception):
    """An expected failure; the message is shown to the user as is."""


class NotFoundError(ServiceError):
    pass


class OrgNotFoundError(NotFoundError):
    def __init__(self, org_id: int) -> None:
        super().__init__(f"Org {org_id} does not exist.")


class OrgWithoutOwnerError(ServiceError):
    """An org cannot be billed before it has an owner (Stripe's customer is the owner)."""

    def __init__(self, org_id: int) -> None:
        super().__init__(f"Org {org_id} has no owner: add one before it can be billed.")


class ConflictError(ServiceError):
    pass


class InvalidInputError(ServiceError):
    pass


# Input checks ------------------------------------------------------------------------
# Whoever calls (the CLI, the service API), a value that cannot be stored is refused
# here with one sentence, before the database would answer with a driver error.

MAX_ID = 2**31 - 1  # ids are Postgres `integer`s
MAX_NAME = 255
MAX_EMAIL = 320
MAX_REQUEST_COUNT = 2**31 - 1
# Requests are billed by period: a time outside these years is a typo, not usage.
# Stripe takes meter events up to 35 days old and a period lasts at most 31 days,
# so no report can bill a request older than this: it may be deleted.
REQUESTS_BILLABLE_FOR = timedelta(days=35 + 31)
EARLIEST_REQUEST = datetime(2000, 1, 1, tzinfo=UTC)
REQUESTS_AHEAD = timedelta(days=5 * 366)


def checked_text(value: str, what: str, *, max_length: int = MAX_NAME) -> str:
    """`value` stripped, refused if it holds control characters or is too long."""
    text = value.strip()
    # Unpaired surrogates (valid in JSON, not in UTF-8) cannot be stored either.
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in text):
        raise InvalidInputError(f"The {what} must not contain control characters.")
    if len(text) > max_length:
        raise InvalidInputError(
            f"The {what} is {len(text)} characters long; at most {max_length} fit."
        )
    return text


def valid_id(org_id: int) -> bool:
    return 0 < org_id <= MAX_ID


# Users -------------------------------------------------------------------------------


def normalize_email(email: str) -> str:
    """Emails are unique per user; compare them case-insensitively."""
    value = checked_text(email, "email address", max_length=MAX_EMAIL).lower()
    if "@" not in value or value.startswith("@") or value.endswith("@"):
        raise InvalidInputError(f"{value!r} is not an email address.")
    return value


def split_name(full_name: str | None) -> tuple[str, str]:
    """`--name "Ada Lovelace"` becomes first and last name; one word is a first name."""
    if not full_name or not full_name.strip():
        return "", ""
    first, _, last = checked_text(full_name, "name", max_length=2 * MAX_NAME).partition(" ")
    return checked_text(first, "first name"), checked_text(last, "last name")


def _get_or_create_user(session: Session, email: str, first_name: str, last_name: str) -> User:
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email, first_name=first_name, last_name=last_name)
        session.add(user)
        session.flush()
        return user
    # Fill in a name the user did not have yet; never overwrite one.
    if first_name and not user.first_name:
        user.first_name = first_name
    if last_name and not user.last_name:
        user.last_name = last_name
    return user


def find_user(session: Session, email: str) -> User:
    address = normalize_email(email)
    user = session.scalar(select(User).where(User.email == address))
    if user is None:
        raise NotFoundError(f"No user has the email {address}.")
    return user


def user_id_by_external_id(session: Session, external_id: str) -> int | None:
    """The user the console names `external_id` (a JWKS token's `sub`), if any."""
    return session.scalar(select(User.id).where(User.external_id == external_id))


def user_id_by_email(session: Session, email: str) -> int | None:
    """The user with this email address (compared as stored: lower case), if any."""
    return session.scalar(select(User.id).where(User.email == email.strip().lower()))


# Orgs --------------------------------------------------------------------------------


def create_org_with_owner(
    session: Session,
    *,
    name: str,
    owner_email: str,
    owner_first_name: str = "",
    owner_last_name: str = "",
    aws_account_id: str | None = None,
    azure_subscription_id: str | None = None,
) -> Org:
    """The org, its owner (an existing user is reused) and the owner membership, together."""
    name = checked_text(name, "org name")
    if not name:
        raise InvalidInputError("The org name must not be empty.")
    email = normalize_email(owner_email)
    owner = _get_or_create_user(
        session,
        email,
        checked_text(owner_first_name, "owner's first name"),
        checked_text(owner_last_name, "owner's last name"),
    )
    org = Org(
        uid=str(uuid.uuid4()),
        name=name,
        aws_account_id=checked_text(aws_account_id or "", "AWS account id") or None,
        azure_subscription_id=checked_text(azure_subscription_id or "", "Azure subscription id")
        or None,
    )
    session.add(org)
    session.flush()
    session.add(Membership(org_id=org.id, user_id=owner.id, role=MembershipRole.OWNER))
    session.flush()
    return org


def orgs_with_name_and_owner(session: Session, name: str, owner_email: str) -> list[int]:
    """The orgs already called `name` and owned by `owner_email`: most likely a repeated create."""
    email = normalize_email(owner_email)
    return list(
        session.scalars(
            select(Org.id)
            .join(Membership, Membership.org_id == Org.id)
            .join(User, User.id == Membership.user_id)
            .where(
                Org.name == checked_text(name, "org name"),
                User.email == email,
                Membership.role == MembershipRole.OWNER,
            )
            .order_by(Org.id)
        )
    )


def find_org(session: Session, org_id: int) -> Org | None:
    return session.get(Org, org_id) if valid_id(org_id) else None


def get_org(session: Session, org_id: int, *, for_update: bool = False) -> Org:
    """The org's row (locked until the transaction ends with `for_update`)."""
    org = session.get(Org, org_id, with_for_update=for_update) if valid_id(org_id) else None
    if org is None:
        raise OrgNotFoundError(org_id)
    return org


def org_exists(session: Session, org_id: int) -> bool:
    if not valid_id(org_id):
        return False
    return session.scalar(select(Org.id).where(Org.id == org_id)) is not None


def find_org_by_name(session: Session, name: str) -> Org | None:
    return session.scalar(select(Org).where(Org.name == name).order_by(Org.id).limit(1))


def org_id_for_customer(session: Session, customer_id: str) -> int | None:
    """The org whose row holds this Stripe customer id (authoritative for routing)."""
    return session.scalar(select(Org.id).where(Org.stripe_customer_id == customer_id))


@dataclass(frozen=True)
class RoutingFacts:
    """What the database says about one webhook's customer id and org id."""

    org_for_customer: int | None  # the org whose row holds the customer id
    org_exists: bool  # whether the org id names an org


# One statement for any number of events: each pair's answers, in the pairs' order.
# The pairs travel as one JSON document (cheaper to send than a parameter per value).
_ROUTING_FACTS = text(
    """
    SELECT (SELECT o.id FROM orgs AS o WHERE o.stripe_customer_id = w.customer_id),
           EXISTS (SELECT 1 FROM orgs AS o WHERE o.id = w.org_id)
    FROM jsonb_to_recordset(CAST(:pairs AS jsonb))
         AS w(n integer, customer_id varchar, org_id integer)
    ORDER BY w.n
    """
)


def routing_facts(
    connection: Connection, pairs: Sequence[tuple[str | None, int | None]]
) -> list[RoutingFacts]:
    """`org_id_for_customer` and `org_exists` for many (customer id, org id) pairs at once.

    The webhook route asks both questions for every event; one round trip
    answers them for every event in flight. None asks nothing.
    """
    if not pairs:
        return []
    document = [
        {
            "n": n,
            "customer_id": customer,
            "org_id": org if org is not None and valid_id(org) else None,
        }
        for n, (customer, org) in enumerate(pairs)
    ]
    rows = connection.execute(_ROUTING_FACTS, {"pairs": orjson.dumps(document).decode()})
    return [RoutingFacts(org_for_customer=found, org_exists=bool(exists)) for found, exists in rows]


def existing_org_ids(session: Session, org_ids: list[int]) -> list[int]:
    """The ids among `org_ids` that have a row (workflows can outlive their org)."""
    if not org_ids:
        return []
    return list(session.scalars(select(Org.id).where(Org.id.in_(org_ids)).order_by(Org.id)))


def orgs_without_billing(
    session: Session, *, after_id: int = 0, limit: int | None = None
) -> list[int]:
    """Orgs to provision, in id order: no Stripe subscription and not billed elsewhere.

    The condition is the partial index `ix_orgs_without_billing`'s, so pages
    (`after_id`, `limit`) read only the index.
    """
    query = (
        select(Org.id)
        .where(
            Org.stripe_subscription_id.is_(None),
            ~Org.billed_elsewhere,
            Org.closed_at.is_(None),
            Org.id > after_id,
        )
        .order_by(Org.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def org_profile(session: Session, org_id: int) -> OrgProfile:
    """The org and its owner, as Stripe needs them."""
    org = get_org(session, org_id)
    owner = session.scalars(
        select(User)
        .join(Membership, Membership.user_id == User.id)
        .where(
            Membership.org_id == org_id,
            Membership.role == MembershipRole.OWNER,
            _current(),
        )
    ).first()
    if owner is None:
        raise OrgWithoutOwnerError(org_id)
    return OrgProfile(
        org_id=org.id,
        org_uid=org.uid,
        name=org.name,
        owner_email=owner.email,
        owner_first_name=owner.first_name,
        owner_last_name=owner.last_name,
        aws_account_id=org.aws_account_id,
        azure_subscription_id=org.azure_subscription_id,
        stripe_customer_id=org.stripe_customer_id,
        stripe_subscription_id=org.stripe_subscription_id,
        closed_at=org.closed_at,
        subscription_status=org.subscription_status,
    )


def org_uid(session: Session, org_id: int) -> str:
    """The org's uid: with `BILLING_SOURCE`, what tells it apart in a shared Stripe account."""
    return get_org(session, org_id).uid


def save_customer(session: Session, org_id: int, customer_id: str) -> None:
    get_org(session, org_id, for_update=True).stripe_customer_id = customer_id


def _shown(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def save_subscription(
    session: Session,
    org_id: int,
    subscription: SubscriptionSnapshot,
    *,
    synced_at: datetime | None = None,
) -> list[FieldDifference]:
    """Bring the org row in line with Stripe's subscription; return what differed.

    `synced_at` stamps the read: the UPDATE only applies over an older stamp (or
    none), so a read that lost a race to a newer one changes nothing and
    returns no differences. Without it (callers that predate the stamp) the row
    is written as before and its stamp is left alone.
    """
    org = get_org(session, org_id, for_update=True)
    wanted: dict[str, object] = {
        "stripe_customer_id": subscription.customer_id,
        "stripe_subscription_id": subscription.id,
        "subscription_status": subscription.status,
        "subscription_end": subscription.subscription_end,
    }
    if (
        synced_at is not None
        and org.stripe_synced_at is not None
        and (org.stripe_synced_at > synced_at)
    ):
        return []
    diffs: list[FieldDifference] = []
    for field, value in wanted.items():
        before = getattr(org, field)
        if _shown(before) != _shown(value):
            diffs.append(FieldDifference(field=field, before=_shown(before), after=_shown(value)))
    if synced_at is None:
        for field, value in wanted.items():
            setattr(org, field, value)
        return diffs
    result = session.execute(
        update(Org)
        .where(
            Org.id == org_id,
            or_(Org.stripe_synced_at.is_(None), Org.stripe_synced_at <= synced_at),
        )
        .values(**wanted, stripe_synced_at=synced_at)
        .execution_options(synchronize_session="fetch")
    )
    return diffs if result.rowcount else []  # type: ignore[attr-defined]


# What the CLI shows ------------------------------------------------------------------


@dataclass(frozen=True)
class OrgSummary:
    """An org row with the counts the CLI shows next to it."""

    id: int
    uid: str
    name: str
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    subscription_status: SubscriptionStatus
    subscription_end: datetime | None
    aws_account_id: str | None
    azure_subscription_id: str | None
    billed_elsewhere: bool
    owner_email: str | None
    members: int
    created_at: datetime
    closed_at: datetime | None = None
    owner_first_name: str = ""
    owner_last_name: str = ""


def _summaries(session: Session, orgs: list[Org]) -> list[OrgSummary]:
    if not orgs:
        return []
    ids = [o.id for o in orgs]
    counts: dict[int, int] = {
        org_id: count
        for org_id, count in session.execute(
            select(Membership.org_id, func.count())
            .where(Membership.org_id.in_(ids), _current())
            .group_by(Membership.org_id)
        )
    }
    owners: dict[int, tuple[str, str, str]] = {
        org_id: (email, first, last)
        for org_id, email, first, last in session.execute(
            select(Membership.org_id, User.email, User.first_name, User.last_name)
            .join(User, User.id == Membership.user_id)
            .where(Membership.org_id.in_(ids), Membership.role == MembershipRole.OWNER, _current())
        )
    }
    return [
        OrgSummary(
            id=o.id,
            uid=o.uid,
            name=o.name,
            stripe_customer_id=o.stripe_customer_id,
            stripe_subscription_id=o.stripe_subscription_id,
            subscription_status=o.subscription_status,
            subscription_end=o.subscription_end,
            aws_account_id=o.aws_account_id,
            azure_subscription_id=o.azure_subscription_id,
            billed_elsewhere=o.billed_elsewhere,
            owner_email=owners[o.id][0] if o.id in owners else None,
            members=counts.get(o.id, 0),
            created_at=o.created_at,
            closed_at=o.closed_at,
            owner_first_name=owners[o.id][1] if o.id in owners else "",
            owner_last_name=owners[o.id][2] if o.id in owners else "",
        )
        for o in orgs
    ]


def org_summary(session: Session, org_id: int) -> OrgSummary:
    return _summaries(session, [get_org(session, org_id)])[0]


def list_orgs(session: Session) -> list[OrgSummary]:
    return _summaries(session, list(session.scalars(select(Org).order_by(Org.id))))


# Members -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberView:
    email: str
    first_name: str
    last_name: str
    role: MembershipRole
    user_id: int


def _current() -> ColumnElement[bool]:
    """Memberships that have not ended: who is in the org now."""
    return Membership.left_at.is_(None)


def is_member(session: Session, org_id: int, user_id: int) -> bool:
    return member_role(session, org_id, user_id) is not None


def member_role(session: Session, org_id: int, user_id: int) -> MembershipRole | None:
    """The user's current role in the org, or None when they are not a member (now)."""
    return session.scalar(
        select(Membership.role).where(
            Membership.org_id == org_id, Membership.user_id == user_id, _current()
        )
    )


def grantable_role(value: str) -> MembershipRole:
    """A role an operator may give a member: `member` or `billing_admin`, never `owner`."""
    names = " or ".join(role.value for role in GRANTABLE_ROLES)
    if value == MembershipRole.OWNER:
        raise InvalidInputError(
            f"An org has exactly one owner, set when it is created; use {names}."
        )
    for role in GRANTABLE_ROLES:
        if value == role.value:
            return role
    raise InvalidInputError(f"{value!r} is not a role; use {names}.")


def member_count(session: Session, org_id: int) -> int:
    """Who is in the org now, the owner included."""
    count = session.scalar(
        select(func.count()).select_from(Membership).where(Membership.org_id == org_id, _current())
    )
    return int(count or 0)


def member_count_at(session: Session, org_id: int, at: datetime) -> int:
    """What the users meter counts: the members at `at`, from the membership history.

    A member joined at or before `at` and had not left by then; the owner counts.
    """
    count = session.scalar(
        select(func.count())
        .select_from(Membership)
        .where(
            Membership.org_id == org_id,
            Membership.joined_at <= at,
            or_(Membership.left_at.is_(None), Membership.left_at > at),
        )
    )
    return int(count or 0)


def get_membership(session: Session, org_id: int, email: str) -> Membership:
    """The user's current membership in the org; the error says which of the two is missing."""
    get_org(session, org_id)
    user = find_user(session, email)
    membership = session.scalar(
        select(Membership).where(
            Membership.org_id == org_id, Membership.user_id == user.id, _current()
        )
    )
    if membership is None:
        raise NotFoundError(f"{user.email} is not a member of org {org_id}.")
    return membership


def _moment(at: datetime | None) -> datetime:
    """`at` (a naive time is UTC), or now."""
    if at is None:
        return datetime.now(UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def add_member(
    session: Session,
    org_id: int,
    email: str,
    full_name: str | None = None,
    role: MembershipRole = MembershipRole.MEMBER,
    *,
    at: datetime | None = None,
) -> User:
    """Add a user (created if new) to the org as a member or billing admin, from `at`.

    A user who left before comes back with a new membership; the old one stays
    as history. A current member asked for another role gets it (the owner's
    role never changes here); asked for the role they have, it is a conflict.
    """
    role = grantable_role(role)
    get_org(session, org_id)
    first, last = split_name(full_name)
    user = _get_or_create_user(session, normalize_email(email), first, last)
    existing = session.scalar(
        select(Membership).where(
            Membership.org_id == org_id, Membership.user_id == user.id, _current()
        )
    )
    if existing is not None:
        if existing.role == role or existing.role == MembershipRole.OWNER:
            raise ConflictError(
                f"{user.email} is already a member of org {org_id} (role {existing.role.value})."
            )
        existing.role = role
        session.flush()
        return user
    session.add(Membership(org_id=org_id, user_id=user.id, role=role, joined_at=_moment(at)))
    try:
        session.flush()
    except IntegrityError as err:
        raise ConflictError(f"{user.email} is already a member of org {org_id}.") from err
    return user


def remove_member(session: Session, org_id: int, email: str, *, at: datetime | None = None) -> User:
    """End a membership at `at` (default now), keeping it as history; the owner stays.

    Every org must keep its owner. The users meter stops counting the member
    from `at` on; periods that ended before still count them.
    """
    membership = get_membership(session, org_id, email)
    user = membership.user
    if membership.role == MembershipRole.OWNER:
        raise ConflictError(f"{user.email} owns org {org_id} and cannot be removed.")
    left_at = _moment(at)
    if left_at < membership.joined_at:
        raise InvalidInputError(
            f"{user.email} joined org {org_id} at {membership.joined_at.isoformat()}; "
            "they cannot leave before that."
        )
    membership.left_at = left_at
    session.flush()
    return user


def list_members(session: Session, org_id: int) -> list[MemberView]:
    """The current members: owner first, then members by email."""
    get_org(session, org_id)
    rows = session.execute(
        select(User, Membership.role)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org_id, _current())
        .order_by((Membership.role != MembershipRole.OWNER), User.email)
    )
    return [
        MemberView(
            email=user.email,
            first_name=user.first_name,
            last_name=user.last_name,
            role=role,
            user_id=user.id,
        )
        for user, role in rows
    ]


# Requests ----------------------------------------------------------------------------


def record_requests(
    session: Session, org_id: int, count: int, at: datetime | None = None
) -> RequestLog:
    if not 1 <= count <= MAX_REQUEST_COUNT:
        raise InvalidInputError(
            f"The request count must be between 1 and {MAX_REQUEST_COUNT}, not {count}."
        )
    ensure_open(session, org_id)
    now = datetime.now(UTC)
    when = at or now
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if not EARLIEST_REQUEST <= when <= now + REQUESTS_AHEAD:
        raise InvalidInputError(
            f"{when.isoformat()} is outside any billing period this service can bill "
            f"(from {EARLIEST_REQUEST.year} to five years ahead)."
        )
    row = RequestLog(org_id=org_id, count=count, occurred_at=when)
    session.add(row)
    session.flush()
    return row


def request_total(
    session: Session,
    org_id: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    through: datetime | None = None,
) -> int:
    """Requests the org made, all of them or those in [since, until), up to `through` included.

    `through` is a report's time: requests recorded with a later timestamp have
    not happened yet for that report, so it does not bill them early.
    """
    query = select(func.coalesce(func.sum(RequestLog.count), 0)).where(RequestLog.org_id == org_id)
    if since is not None:
        query = query.where(RequestLog.occurred_at >= since)
    if until is not None:
        query = query.where(RequestLog.occurred_at < until)
    if through is not None:
        query = query.where(RequestLog.occurred_at <= through)
    return int(session.scalar(query) or 0)


def prune_requests(session: Session, *, before: datetime, now: datetime, limit: int) -> int:
    """Delete up to `limit` request-log rows older than `before`; returns how many.

    Refuses a `before` inside the window a report may still bill. Callers commit
    each batch, so a large delete never holds one long transaction (docs/operations.md).
    """
    if before > now - REQUESTS_BILLABLE_FOR:
        raise InvalidInputError(
            f"Requests after {(now - REQUESTS_BILLABLE_FOR).date().isoformat()} may still be "
            f"billed (Stripe takes usage up to 35 days old, a period lasts up to 31 days); "
            "keep at least 66 days."
        )
    if limit < 1:
        raise InvalidInputError(f"The batch size must be at least 1, not {limit}.")
    # By row address: the oldest rows sit together (time order), found through the
    # BRIN index on occurred_at; no per-row index lookups.
    result = session.execute(
        text(
            "DELETE FROM request_log WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM request_log WHERE occurred_at < :before LIMIT :limit))"
        ),
        {"before": before, "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def save_entitlement(
    session: Session, org_id: int, *, entitled: bool, access_until: datetime | None
) -> None:
    """Write the entitlement rule's answer to the org row (the org's workflow does, on change)."""
    session.execute(
        update(Org)
        .where(Org.id == org_id)
        .values(entitled=entitled, access_until=access_until)
        .execution_options(synchronize_session=False)
    )


# The service API: orgs and members under the console's ids, usage items -------------

MAX_UID = 36
MAX_EXTERNAL_ID = 255
MAX_ITEM_ID = 255
MAX_USAGE_ITEMS = 1000


class OrgClosedError(ConflictError):
    """The org was closed: it takes no more changes or usage."""

    def __init__(self, org_id: int, closed_at: datetime) -> None:
        self.closed_at = closed_at
        super().__init__(f"Org {org_id} was closed at {closed_at.astimezone(UTC).isoformat()}.")


@dataclass(frozen=True)
class OwnerInput:
    email: str
    first_name: str = ""
    last_name: str = ""


@dataclass(frozen=True)
class OrgInput:
    """What the console says an org is (`PUT /api/orgs/{org_id}`)."""

    uid: str
    name: str
    owner: OwnerInput
    aws_account_id: str | None = None
    azure_subscription_id: str | None = None


@dataclass(frozen=True)
class CustomerFacts:
    """What the org's Stripe customer shows: a change of any of these is synced to Stripe."""

    name: str
    owner_email: str
    owner_first_name: str
    owner_last_name: str


@dataclass(frozen=True)
class OrgPut:
    """The outcome of a PUT: the org as it is now, and what the workflow must hear of."""

    org: OrgSummary
    created: bool
    customer_changed: bool
    marketplace_changed: bool
    # Other orgs the owner owns, whose Stripe customer shows the owner's changed name.
    also_changed: tuple[int, ...] = ()


def _optional_id(value: str | None, what: str) -> str | None:
    return checked_text(value or "", what) or None


def _checked_org_input(data: OrgInput) -> OrgInput:
    uid = checked_text(data.uid, "org uid", max_length=MAX_UID)
    if not uid:
        raise InvalidInputError("The org uid must not be empty.")
    name = checked_text(data.name, "org name")
    if not name:
        raise InvalidInputError("The org name must not be empty.")
    return OrgInput(
        uid=uid,
        name=name,
        owner=OwnerInput(
            email=normalize_email(data.owner.email),
            first_name=checked_text(data.owner.first_name, "owner's first name"),
            last_name=checked_text(data.owner.last_name, "owner's last name"),
        ),
        aws_account_id=_optional_id(data.aws_account_id, "AWS account id"),
        azure_subscription_id=_optional_id(data.azure_subscription_id, "Azure subscription id"),
    )


def _upsert_user(session: Session, email: str) -> User:
    """The user with this email, inserted if new; safe against a concurrent insert."""
    session.execute(
        pg_insert(User)
        .values(email=email, first_name="", last_name="")
        .on_conflict_do_nothing(index_elements=[User.email])
    )
    user = session.scalar(select(User).where(User.email == email))
    assert user is not None
    return user


def _owner_membership(session: Session, org_id: int) -> Membership | None:
    return session.scalar(
        select(Membership).where(
            Membership.org_id == org_id, Membership.role == MembershipRole.OWNER, _current()
        )
    )


def _customer_facts(session: Session, org: Org) -> CustomerFacts | None:
    owner = _owner_membership(session, org.id)
    if owner is None:
        return None
    return CustomerFacts(
        name=org.name,
        owner_email=owner.user.email,
        owner_first_name=owner.user.first_name,
        owner_last_name=owner.user.last_name,
    )


def _owned_elsewhere(session: Session, user: User, org_id: int) -> tuple[int, ...]:
    """The other open orgs `user` owns (their customers carry the user's name and email)."""
    return tuple(
        session.scalars(
            select(Membership.org_id)
            .join(Org, Org.id == Membership.org_id)
            .where(
                Membership.user_id == user.id,
                Membership.role == MembershipRole.OWNER,
                Membership.org_id != org_id,
                Org.closed_at.is_(None),
                _current(),
            )
            .order_by(Membership.org_id)
        )
    )


def _set_person(user: User, email: str, first_name: str, last_name: str) -> bool:
    """Give the user these details; True if any changed."""
    before = (user.email, user.first_name, user.last_name)
    user.email, user.first_name, user.last_name = email, first_name, last_name
    return before != (email, first_name, last_name)


def _make_owner(session: Session, org_id: int, user: User) -> None:
    """`user` becomes the org's one owner; a previous owner stays, as a billing admin."""
    previous = _owner_membership(session, org_id)
    if previous is not None and previous.user_id == user.id:
        return
    if previous is not None:
        previous.role = MembershipRole.BILLING_ADMIN
        session.flush()
    membership = session.scalar(
        select(Membership).where(
            Membership.org_id == org_id, Membership.user_id == user.id, _current()
        )
    )
    if membership is None:
        session.add(Membership(org_id=org_id, user_id=user.id, role=MembershipRole.OWNER))
    else:
        membership.role = MembershipRole.OWNER
    session.flush()


def _keep_sequence_ahead(session: Session, org_id: int) -> None:
    """Orgs made here (`billing orgs create`) never take an id the console already used."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext('orgs_id_seq'))"))
    session.execute(
        text(
            "SELECT setval(pg_get_serial_sequence('orgs', 'id'), "
            "GREATEST(:id, (SELECT last_value FROM orgs_id_seq)))"
        ),
        {"id": org_id},
    )


def _open_org(session: Session, org_id: int) -> Org:
    """The org's row, locked; a closed org refuses changes."""
    org = get_org(session, org_id, for_update=True)
    if org.closed_at is not None:
        raise OrgClosedError(org_id, org.closed_at)
    return org


def put_org(session: Session, org_id: int, data: OrgInput) -> OrgPut:
    """Create or update the org under the console's id, with its owner.

    Concurrent PUTs of one org make one org: the insert does nothing when the id
    exists (it waits for a concurrent insert to commit), and the update path
    holds the row's lock. A uid that differs from the org's, or that another
    org has, is a conflict; so is a change to a closed org.
    """
    if not valid_id(org_id):
        raise InvalidInputError(f"The org id must be between 1 and {MAX_ID}, not {org_id}.")
    data = _checked_org_input(data)
    inserted = session.scalar(
        pg_insert(Org)
        .values(
            id=org_id,
            uid=data.uid,
            name=data.name,
            aws_account_id=data.aws_account_id,
            azure_subscription_id=data.azure_subscription_id,
        )
        .on_conflict_do_nothing()
        .returning(Org.id)
    )
    if inserted is not None:
        _keep_sequence_ahead(session, org_id)
        owner = _upsert_user(session, data.owner.email)
        renamed = _set_person(owner, owner.email, data.owner.first_name, data.owner.last_name)
        session.add(Membership(org_id=org_id, user_id=owner.id, role=MembershipRole.OWNER))
        session.flush()
        return OrgPut(
            org=org_summary(session, org_id),
            created=True,
            customer_changed=False,
            marketplace_changed=False,
            also_changed=_owned_elsewhere(session, owner, org_id) if renamed else (),
        )
    org = session.get(Org, org_id, with_for_update=True, populate_existing=True)
    if org is None:
        raise ConflictError(f"The uid {data.uid} belongs to another org.")
    if org.uid != data.uid:
        raise ConflictError(
            f"Org {org_id} has the uid {org.uid}, not {data.uid}: an org's uid never changes."
        )
    if org.closed_at is not None:
        raise OrgClosedError(org_id, org.closed_at)
    before = _customer_facts(session, org)
    marketplace_before = (org.aws_account_id, org.azure_subscription_id)
    org.name = data.name
    org.aws_account_id = data.aws_account_id
    org.azure_subscription_id = data.azure_subscription_id
    owner = _upsert_user(session, data.owner.email)
    renamed = _set_person(owner, owner.email, data.owner.first_name, data.owner.last_name)
    _make_owner(session, org_id, owner)
    session.flush()
    return OrgPut(
        org=org_summary(session, org_id),
        created=False,
        customer_changed=_customer_facts(session, org) != before,
        marketplace_changed=(org.aws_account_id, org.azure_subscription_id) != marketplace_before,
        also_changed=_owned_elsewhere(session, owner, org_id) if renamed else (),
    )


@dataclass(frozen=True)
class OrgClose:
    closed_at: datetime
    newly: bool


def close_org(session: Session, org_id: int, *, at: datetime | None = None) -> OrgClose:
    """Mark the org closed (once: a second close keeps the first time); rows stay."""
    org = get_org(session, org_id, for_update=True)
    if org.closed_at is not None:
        return OrgClose(closed_at=org.closed_at, newly=False)
    org.closed_at = _moment(at)
    session.flush()
    return OrgClose(closed_at=org.closed_at, newly=True)


def ensure_open(session: Session, org_id: int) -> Org:
    """The org's row; a closed org is refused with the time it was closed."""
    org = get_org(session, org_id)
    if org.closed_at is not None:
        raise OrgClosedError(org_id, org.closed_at)
    return org


@dataclass(frozen=True)
class MemberInput:
    email: str
    first_name: str
    last_name: str
    role: str


@dataclass(frozen=True)
class ExternalMember:
    user_external_id: str
    email: str
    first_name: str
    last_name: str
    role: MembershipRole


@dataclass(frozen=True)
class MemberPut:
    member: ExternalMember
    created: bool
    customer_changed: bool
    # Other orgs the user owns, whose Stripe customer shows the user's changed details.
    also_changed: tuple[int, ...] = ()


def _role(value: str) -> MembershipRole:
    for role in MembershipRole:
        if value == role.value:
            return role
    names = ", ".join(role.value for role in MembershipRole)
    raise InvalidInputError(f"{value!r} is not a role; use one of {names}.")


def _external_id(value: str) -> str:
    external_id = checked_text(value, "user's external id", max_length=MAX_EXTERNAL_ID)
    if not external_id:
        raise InvalidInputError("The user's external id must not be empty.")
    return external_id


def put_member(
    session: Session, org_id: int, user_external_id: str, data: MemberInput
) -> MemberPut:
    """Add or update the member the console knows as `user_external_id`.

    The user is found by external id, else by email (an existing user without an
    external id gets this one), else created. Exactly one owner stays: making a
    member the owner turns the previous owner into a billing admin; the owner
    cannot be given another role (make someone else the owner first).
    Changes of one org are serialized by the org row's lock.
    """
    external_id = _external_id(user_external_id)
    role = _role(data.role)
    email = normalize_email(data.email)
    first = checked_text(data.first_name, "first name")
    last = checked_text(data.last_name, "last name")
    org = _open_org(session, org_id)
    before = _customer_facts(session, org)
    user = session.scalar(select(User).where(User.external_id == external_id))
    by_email = session.scalar(select(User).where(User.email == email))
    if user is None:
        if by_email is not None and by_email.external_id not in (None, external_id):
            raise ConflictError(f"{email} belongs to another user ({by_email.external_id}).")
        if by_email is None:
            session.execute(
                pg_insert(User)
                .values(email=email, first_name=first, last_name=last, external_id=external_id)
                .on_conflict_do_nothing()
            )
            by_email = session.scalar(select(User).where(User.email == email))
            if by_email is None or by_email.external_id not in (None, external_id):
                raise ConflictError(f"{email} or {external_id} belongs to another user.")
        user = by_email
        user.external_id = external_id
    elif by_email is not None and by_email.id != user.id:
        raise ConflictError(f"{email} belongs to another user.")
    changed_person = _set_person(user, email, first, last)
    session.flush()
    membership = session.scalar(
        select(Membership).where(
            Membership.org_id == org_id, Membership.user_id == user.id, _current()
        )
    )
    created = membership is None
    if (
        membership is not None
        and membership.role == MembershipRole.OWNER
        and role != (MembershipRole.OWNER)
    ):
        raise ConflictError(
            f"{email} owns org {org_id}: make another member the owner first "
            "(the org keeps exactly one owner)."
        )
    if role == MembershipRole.OWNER:
        _make_owner(session, org_id, user)
    elif membership is None:
        session.add(Membership(org_id=org_id, user_id=user.id, role=role))
    else:
        membership.role = role
    session.flush()
    return MemberPut(
        member=ExternalMember(
            user_external_id=external_id,
            email=email,
            first_name=first,
            last_name=last,
            role=role,
        ),
        created=created,
        customer_changed=_customer_facts(session, org) != before,
        also_changed=_owned_elsewhere(session, user, org_id) if changed_person else (),
    )


def delete_member(
    session: Session, org_id: int, user_external_id: str, *, at: datetime | None = None
) -> bool:
    """End the membership of the console's user (kept as history); False if there was none.

    The owner cannot be removed: make another member the owner first.
    """
    external_id = _external_id(user_external_id)
    _open_org(session, org_id)
    membership = session.scalar(
        select(Membership)
        .join(User, User.id == Membership.user_id)
        .where(Membership.org_id == org_id, User.external_id == external_id, _current())
    )
    if membership is None:
        return False
    if membership.role == MembershipRole.OWNER:
        raise ConflictError(
            f"{external_id} owns org {org_id} and cannot be removed: "
            "make another member the owner first."
        )
    membership.left_at = max(_moment(at), membership.joined_at)
    session.flush()
    return True


@dataclass(frozen=True)
class UsageItem:
    """One usage item as sent; `problem` set when it cannot be recorded."""

    id: str | None
    count: int = 0
    at: datetime | None = None
    problem: str | None = None


@dataclass(frozen=True)
class UsageOutcome:
    id: str | None
    outcome: str  # recorded, duplicate, rejected, late
    detail: str | None = None


def _usage_item(raw: object) -> UsageItem:
    """Check one raw item (a JSON object); a bad one is refused alone, with the reason."""
    if not isinstance(raw, dict):
        return UsageItem(id=None, problem="an item must be an object with id, count and at")
    raw_id = raw.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        return UsageItem(id=None, problem="the item has no id (a non-empty string)")
    try:
        item_id = checked_text(raw_id, "item id", max_length=MAX_ITEM_ID)
    except InvalidInputError as err:
        return UsageItem(id=raw_id[:MAX_ITEM_ID], problem=str(err))
    count = raw.get("count")
    if not isinstance(count, int) or isinstance(count, bool):
        return UsageItem(id=item_id, problem="count must be an integer")
    if not 1 <= count <= MAX_REQUEST_COUNT:
        return UsageItem(
            id=item_id, problem=f"count must be between 1 and {MAX_REQUEST_COUNT}, not {count}"
        )
    raw_at = raw.get("at")
    if not isinstance(raw_at, str):
        return UsageItem(id=item_id, problem="at must be an ISO 8601 time")
    try:
        at = datetime.fromisoformat(
            raw_at.replace("Z", "+00:00") if raw_at.endswith("Z") else raw_at
        )
    except ValueError:
        return UsageItem(id=item_id, problem=f"at {raw_at[:40]!r} is not an ISO 8601 time")
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return UsageItem(id=item_id, count=count, at=at)


def usage_billed_through(session: Session, org_id: int) -> datetime | None:
    """The end of the org's latest period whose final usage report was made.

    A final report's meter events are timestamped at the period's last second;
    requests before this time can no longer be billed (the invoice is made).
    """
    return session.scalar(
        select(func.max(UsageLedger.period_end)).where(
            UsageLedger.org_id == org_id,
            UsageLedger.event_timestamp >= UsageLedger.period_end - timedelta(seconds=1),
        )
    )


_INSERT_ITEMS = text(
    """
    INSERT INTO request_log (org_id, item_id, count, occurred_at)
    SELECT :org_id, i.id, i.count, i.at
    FROM jsonb_to_recordset(CAST(:items AS jsonb)) AS i(id varchar, count integer, at timestamptz)
    ON CONFLICT (org_id, item_id) WHERE item_id IS NOT NULL DO NOTHING
    RETURNING item_id
    """
)


def record_usage_items(
    session: Session, org_id: int, raw_items: Sequence[object], *, now: datetime | None = None
) -> list[UsageOutcome]:
    """Record a batch of usage items, each answered on its own, in the batch's order.

    `recorded`: added to the request log. `duplicate`: an item with this id was
    recorded before (in this batch or an earlier one); nothing is added.
    `late`: recorded, but its period's invoice is already made, so it is not
    billed. `rejected`: not recorded, `detail` says why (a bad item, or a
    closed org). One statement inserts the good items; the unique index on
    (org, item id) tells new from repeated, also against a concurrent batch.
    """
    if len(raw_items) > MAX_USAGE_ITEMS:
        raise InvalidInputError(
            f"A batch holds at most {MAX_USAGE_ITEMS} items, not {len(raw_items)}."
        )
    org = session.get(Org, org_id, with_for_update={"read": True}) if valid_id(org_id) else None
    if org is None:
        raise OrgNotFoundError(org_id)
    items = [_usage_item(raw) for raw in raw_items]
    if org.closed_at is not None:
        closed = f"org {org_id} is closed; usage is no longer recorded"
        return [UsageOutcome(item.id, "rejected", item.problem or closed) for item in items]
    moment = _moment(now)
    first_of: dict[str, int] = {}
    to_insert: list[dict[str, object]] = []
    for n, item in enumerate(items):
        if item.problem is None and item.at is not None and item.id is not None:
            if not EARLIEST_REQUEST <= item.at <= moment + REQUESTS_AHEAD:
                items[n] = UsageItem(
                    id=item.id,
                    problem=(
                        f"{item.at.isoformat()} is outside any billing period this service can "
                        f"bill (from {EARLIEST_REQUEST.year} to five years ahead)"
                    ),
                )
            elif item.id not in first_of:
                first_of[item.id] = n
                to_insert.append({"id": item.id, "count": item.count, "at": item.at.isoformat()})
    inserted: set[str] = set()
    if to_insert:
        inserted = set(
            session.scalars(
                _INSERT_ITEMS, {"org_id": org_id, "items": orjson.dumps(to_insert).decode()}
            )
        )
    billed_through = usage_billed_through(session, org_id)
    outcomes: list[UsageOutcome] = []
    for n, item in enumerate(items):
        if item.problem is not None or item.id is None or item.at is None:
            outcomes.append(UsageOutcome(item.id, "rejected", item.problem))
        elif first_of.get(item.id) != n or item.id not in inserted:
            outcomes.append(UsageOutcome(item.id, "duplicate", "already recorded; nothing added"))
        elif billed_through is not None and item.at < billed_through:
            outcomes.append(
                UsageOutcome(
                    item.id,
                    "late",
                    "period already invoiced: recorded, not billed",
                )
            )
        else:
            outcomes.append(UsageOutcome(item.id, "recorded", None))
    return outcomes
