"""The ``nmoe`` command line. Only argument parsing and presentation live here."""
