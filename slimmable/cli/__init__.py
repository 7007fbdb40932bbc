"""Command-line interface: ``slimmable <command> ...`` (see ``slimmable --help``)."""
