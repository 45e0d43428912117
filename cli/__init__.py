"""The `surgery` command line: parse, call the library, print (rich or --json), return an exit code."""
