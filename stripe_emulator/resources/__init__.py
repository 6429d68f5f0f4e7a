"""Stripe resources; importing this package registers every route on `routing.router`."""

from stripe_emulator.resources import core, meters, platform, subscriptions

__all__ = ["core", "meters", "platform", "subscriptions"]
