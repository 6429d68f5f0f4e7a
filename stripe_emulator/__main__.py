"""`python -m stripe_emulator [--host H] [--port P] [--state-file F]`."""

from __future__ import annotations

import argparse

from stripe_emulator.server import serve


def main() -> None:
    parser = argparse.ArgumentParser(description="Stateful Stripe API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--state-file", default=None)
    parser.add_argument(
        "--missing-payment-method-succeeds",
        action="store_true",
        help="charge customers without a payment method successfully",
    )
    args = parser.parse_args()
    serve(
        args.host,
        args.port,
        args.state_file,
        missing_payment_method_succeeds=args.missing_payment_method_succeeds,
    )


if __name__ == "__main__":
    main()
