"""The `guardrail` command line's subcommands, one module each (`guardrail.cli` registers
them): `serve`/`worker`, `db`, `explain`, `explain-case`, `export-vision`, `report`, `probe`,
`dev`. A command parses its arguments, builds what it needs from the settings and calls the
service or the library; it holds no logic of its own worth testing apart from its output."""
