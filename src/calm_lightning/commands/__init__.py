"""One module per `calm` command. Each is a leaf: it declares its arguments (``add_arguments``) and
runs (``run``) by calling the library (training, evaluation, checkpoints, comparison...), never
another command. `cli.py` builds the parser from ``COMMANDS``, in this order."""

COMMANDS = ("prepare", "train", "eval", "sample", "compare", "export", "import_official", "encode", "decode")
