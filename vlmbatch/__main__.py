"""`python -m vlmbatch`. The guard matters: spawned worker processes import this module as
`__mp_main__`, and must not pay for importing the whole command line."""

if __name__ == "__main__":
    from vlmbatch.cli import main

    main()
