"""Request handlers, one module per resource; they parse, call a reader or repository, answer."""
