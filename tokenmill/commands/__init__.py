"""Sub-commands of the ``tokenmill`` CLI, one module each."""
