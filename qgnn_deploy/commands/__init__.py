"""One module per ``qgnn-deploy`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
