"""The round manager: DDO self-play rounds with an alpha x beta sweep (`ddo-patch rounds`, docs/rounds.md).

manager (run or continue the rounds), config (the TOML file), backend (what a codebase must answer),
launch (local and SLURM jobs), manifest (the crash-safe record), report (status, table, plot), cli.
"""
