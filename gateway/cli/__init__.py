"""`gateway`, the operator command line: main.py has the subcommands; chat.py is `gateway chat`."""
