from tooling.cli.main import main

main()
