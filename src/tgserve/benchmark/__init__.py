"""Load generator and reports; imports no server internals."""
