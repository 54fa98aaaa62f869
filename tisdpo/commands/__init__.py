"""The entry points of the `tisdpo` commands, beside the library modules they drive: `train`, `estimate_weights`,
`contrastive`, `visualize`, `demo`, `fetch_model` (each `main(argv) -> exit status`), and the argument helpers
they share (`arguments`). `tisdpo.cli.COMMANDS` names them; nothing here is imported by `tisdpo --help`.
"""
