"""``python -m decomp`` runs the ``decomp`` command line."""

from decomp.cli import main

if __name__ == "__main__":
    main()
