from patchcore_cli.cli import main

main()
