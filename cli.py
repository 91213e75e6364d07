"""Run mmsearch from a source checkout (`python cli.py ...`): the front end lives in `retrieval/cli.py`."""

from retrieval.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()
