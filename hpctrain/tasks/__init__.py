"""Built-in training tasks: each subpackage owns one task's data generator, model and loss."""
