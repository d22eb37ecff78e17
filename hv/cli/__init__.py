"""The command line: `hv.cli.main` (the parser and the entry point, `hv` and
`python -m hv`), `common` (what every subcommand shares: option types, JSON
output, logging, the VMM built from options, exit codes) and one module per
subcommand (`boot`, `replay` with `inspect`, `attack`, `bench`, `sweep`).

May import every other room of hv; nothing outside hv/cli imports it.
"""
