"""`python -m centered_merge ...` is the `centered-merge` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
