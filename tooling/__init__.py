"""Operator tooling: the `billing` CLI, `billing dev` and the Stripe catalog setup.

The top layer: it may import every product package, none of them imports it.
"""
