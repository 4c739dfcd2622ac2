"""Built-in scheduler plugins, one policy per module."""
