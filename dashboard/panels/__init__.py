"""One module per panel, each with a render(...) function."""
