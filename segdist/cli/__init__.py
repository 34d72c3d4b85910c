"""The command lines: each module parses its arguments and calls one function of the library
(train, eval and predict call the Python API, `segdist.train`, `segdist.evaluate` and
`segdist.predict`: segdist.api), so a command and its Python call run the same code. They run
as console scripts (`segdist-train`, `segdist-eval`, `segdist-predict`, `segdist-shard`,
`segdist-bench`), as `launch/<name>.py` (the same, through a shim), or as modules
(`accelerate launch -m segdist.cli.train RECIPE`). User errors become one stderr line and exit
code 2 (segdist.errors.run_cli)."""
