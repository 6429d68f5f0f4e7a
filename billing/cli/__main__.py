from billing.cli.main import main

main()
