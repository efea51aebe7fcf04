"""`python -m vlmbatch`, and the `vlmbatch` console script (`main`).

Both keep this module light: spawned worker processes re-import the program's main module (this one
as `__mp_main__`, or the console script, which imports `main` from here), and must not pay for
importing the whole command line, torch included, before decoding their first image."""


def main() -> None:
    from vlmbatch.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
