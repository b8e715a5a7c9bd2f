"""`gptcli` and `python -m gptcli`. gptcli.cli.app is imported here, inside the entry point, so that a Ctrl-C while
it loads (a few hundred ms of imports) ends quietly with 130, not with a KeyboardInterrupt traceback."""

import sys


def main() -> None:
    try:
        from gptcli.cli.app import main as run_cli
    except KeyboardInterrupt:
        sys.exit(130)  # EXIT_INTERRUPTED (gptcli.errors may be what was being imported)
    run_cli()


if __name__ == "__main__":
    main()
