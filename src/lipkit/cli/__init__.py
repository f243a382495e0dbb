"""The ``lipkit`` command line: thin subcommands over the library."""
