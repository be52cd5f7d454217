"""`python -m centered_merge ...` is the `centered-merge` command."""

from .cli import console

if __name__ == "__main__":
    console()
