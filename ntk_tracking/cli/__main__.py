"""`python -m ntk_tracking.cli COMMAND …`: the same as `ntk-tracking COMMAND …`."""

from ntk_tracking.cli import main

if __name__ == "__main__":
    main()
