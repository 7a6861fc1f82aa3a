"""The work of each command, with the library (and torch), once its options are checked; one
module per command, so that a command imports only what it uses."""
