"""Parallelism applied to the plain model from outside: mesh, expert parallelism, gradient reduction."""
