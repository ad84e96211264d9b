"""`finetune`, the command line: the top of the house. It may import the API package, the
operator and the trainer (each lazily, per subcommand); none of them imports it."""
