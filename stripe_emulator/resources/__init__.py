"""Stripe resources; importing this package registers every route on `routing.router`."""

from stripe_emulator.resources import checkout, core, meters, platform, subscriptions

__all__ = ["checkout", "core", "meters", "platform", "subscriptions"]
